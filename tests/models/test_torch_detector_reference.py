"""Checks of the PyTorch RetinaNet reference in third_party/lit_torch (parity spec sections 3-7, 12, 13)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from third_party.lit_torch import (
    FPN,
    RetinaHead,
    RetinaNetRef,
    anchors_ref,
    batched_nms_ref,
    bbox2delta_ref,
    count_params,
    delta2bbox_ref,
    multiclass_nms_ref,
    nms_ref,
    retinanet_simple_test_ref,
    save_random_checkpoint,
    save_random_detector,
)
from third_party.lit_torch.save_detector import COCO_CLASSES

torch.set_num_threads(1)

# spec section 13
COUNTS = {
    "lit_ti": dict(backbone=19_371_736, neck=3_786_752, head=6_463_220),
    "lit_s": dict(backbone=27_966_192, neck=4_474_880, head=6_463_220),
}
C2_C5 = {"lit_ti": (64, 128, 320, 512), "lit_s": (96, 192, 384, 768)}


def _conv(prefix, o, i, k):
    return {f"{prefix}.weight": (o, i, k, k), f"{prefix}.bias": (o,)}


def expected_neck_head(c5_list):
    """neck.* and bbox_head.* keys and shapes, written out from spec section 12 'RetinaNet'."""
    exp = {}
    for i, c in enumerate(c5_list[1:]):
        exp.update(_conv(f"neck.lateral_convs.{i}.conv", 256, c, 1))
        exp.update(_conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3))
    exp.update(_conv("neck.fpn_convs.3.conv", 256, c5_list[-1], 3))
    exp.update(_conv("neck.fpn_convs.4.conv", 256, 256, 3))
    for t in ("cls", "reg"):
        for i in range(4):
            exp.update(_conv(f"bbox_head.{t}_convs.{i}.conv", 256, 256, 3))
    exp.update(_conv("bbox_head.retina_cls", 720, 256, 3))
    exp.update(_conv("bbox_head.retina_reg", 36, 256, 3))
    return exp


@pytest.fixture(scope="module", params=["lit_ti", "lit_s"])
def retina(request):
    torch.manual_seed(0)
    return request.param, RetinaNetRef(request.param).eval()


def test_param_counts(retina):
    name, m = retina
    exp = COUNTS[name]
    assert count_params(m.backbone) == exp["backbone"]
    assert count_params(m.neck) == exp["neck"]
    assert count_params(m.bbox_head) == exp["head"]
    assert count_params(m) == sum(exp.values())
    assert count_params(m) == {"lit_ti": 29_621_708, "lit_s": 38_904_292}[name]


def test_mask_rcnn_fpn_counts_and_p6():
    # spec section 13: MRCNN necks 2,623,488 (Ti) / 2,729,984 (S); section 5: P6 = max_pool(k1, s2)(P5)
    for name, n in (("lit_ti", 2_623_488), ("lit_s", 2_729_984)):
        fpn = FPN(list(C2_C5[name]), 256, num_outs=5, start_level=0)
        assert count_params(fpn) == n
        assert sorted(k for k in fpn.state_dict() if k.endswith(".weight")) == sorted(
            [f"lateral_convs.{i}.conv.weight" for i in range(4)] + [f"fpn_convs.{i}.conv.weight" for i in range(4)])
    torch.manual_seed(1)
    fpn = FPN([8, 8, 8, 8], 16, num_outs=5, start_level=0)
    xs = [torch.randn(1, 8, 40 // 2 ** i, 24 // 2 ** i) for i in range(4)]  # 5x3 at the top: odd sizes
    with torch.no_grad():
        outs = fpn(xs)
    assert len(outs) == 5
    assert torch.equal(outs[4], outs[3][:, :, ::2, ::2])
    assert outs[4].shape[-2:] == (3, 2)


def test_neck_head_keys_and_shapes(retina):
    name, m = retina
    sd = m.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(("neck.", "bbox_head."))}
    assert got == expected_neck_head(C2_C5[name])
    assert tuple(sd["neck.fpn_convs.3.conv.weight"].shape) == (256, C2_C5[name][-1], 3, 3)
    assert all(k.startswith(("backbone.", "neck.", "bbox_head.")) for k in sd)


def test_default_inits():
    torch.manual_seed(0)
    head = RetinaHead()
    assert torch.allclose(head.retina_cls.bias, torch.full((720,), -math.log(99.0)))
    assert abs(head.retina_cls.bias[0].item() - (-4.59512)) < 1e-5
    assert abs(head.cls_convs[0].conv.weight.std().item() - 0.01) < 1e-3
    assert torch.count_nonzero(head.reg_convs[0].conv.bias) == 0
    fpn = FPN([64, 128, 320, 512], 256, 5, start_level=1, add_extra_convs="on_input")
    w = fpn.fpn_convs[3].conv.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6.0 / (512 * 9 + 256 * 9))
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.95 * bound
    assert torch.count_nonzero(fpn.lateral_convs[0].conv.bias) == 0


def test_fpn_topdown_nearest_and_extra_convs():
    """Identity output convs expose the top-down sums: nearest to the lower size == exact 2x repeat
    (32-padded input 256x384 -> C2..C5 64x96 ... 8x12); P6 = conv s2 p1 on C5; P7 = conv s2 p1 on P6, no ReLU."""
    torch.manual_seed(0)
    chans = [16, 24, 32, 40]
    fpn = FPN(chans, 8, num_outs=5, start_level=1, add_extra_convs="on_input").eval()
    with torch.no_grad():
        for i in range(3):
            w = torch.zeros(8, 8, 3, 3)
            w[:, :, 1, 1] = torch.eye(8)
            fpn.fpn_convs[i].conv.weight.copy_(w)
            fpn.fpn_convs[i].conv.bias.zero_()
        for c in fpn.modules():
            if isinstance(c, nn.Conv2d) and c.bias.abs().sum() == 0 and c not in [fpn.fpn_convs[i].conv for i in range(3)]:
                c.bias.normal_()
    xs = [torch.randn(1, c, 64 // 2 ** i, 96 // 2 ** i) for i, c in enumerate(chans)]
    with torch.no_grad():
        outs = fpn(xs)
        lat = [fpn.lateral_convs[i].conv(xs[i + 1]) for i in range(3)]
        rep = lambda t: t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # noqa: E731
        p5 = lat[2]
        p4 = lat[1] + rep(p5)
        p3 = lat[0] + rep(p4)
        c6 = fpn.fpn_convs[3].conv
        c7 = fpn.fpn_convs[4].conv
        p6 = F.conv2d(xs[3], c6.weight, c6.bias, stride=2, padding=1)
        p7 = F.conv2d(p6, c7.weight, c7.bias, stride=2, padding=1)
    assert [tuple(o.shape[-2:]) for o in outs] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    torch.testing.assert_close(outs[0], p3, rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[1], p4, rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[2], p5, rtol=0, atol=1e-6)
    assert torch.equal(outs[3], p6)
    assert (p6 < 0).any()  # a ReLU before P7 would change the result
    assert torch.equal(outs[4], p7)
    assert not torch.allclose(outs[4], F.conv2d(F.relu(p6), c7.weight, c7.bias, stride=2, padding=1))


def test_anchor_half_sizes_and_order():
    (a,) = anchors_ref([(1, 1)], [8])
    assert a.dtype == torch.float32 and a.shape == (9, 4)
    half_w = (a[:, 2] - a[:, 0]) / 2
    half_h = (a[:, 3] - a[:, 1]) / 2
    r05 = [(22.627, 11.314), (28.509, 14.254), (35.919, 17.959)]
    r1 = [(16.0, 16.0), (20.159, 20.159), (25.398, 25.398)]
    r2 = [(h, w) for w, h in r05]
    exp = torch.tensor(r05 + r1 + r2)  # index = ratio_i * 3 + scale_i
    torch.testing.assert_close(torch.stack([half_w, half_h], 1), exp, rtol=0, atol=1e-3)
    torch.testing.assert_close(a[:, :2], -a[:, 2:], rtol=0, atol=0)  # centred on the cell corner (0, 0)
    # flat order (y*W + x)*A + a, centres at (x*stride, y*stride); levels concatenated low to high
    lv = anchors_ref([(2, 3), (1, 2)], [8, 16])
    assert [t.shape[0] for t in lv] == [2 * 3 * 9, 1 * 2 * 9]
    ctr = (lv[0][:, :2] + lv[0][:, 2:]) / 2
    for y in range(2):
        for x in range(3):
            for k in range(9):
                r = (y * 3 + x) * 9 + k
                assert torch.allclose(ctr[r], torch.tensor([8.0 * x, 8.0 * y]), rtol=0, atol=1e-5)
                assert torch.equal(lv[0][r], a[k] + torch.tensor([8.0 * x, 8.0 * y] * 2))  # fp32 base + shift
    assert torch.equal(anchors_ref([(2, 3), (1, 2)], [8, 16], concat=True), torch.cat(lv))


def test_delta2bbox_clamp_and_clip():
    anchors = torch.tensor([[10.0, 20.0, 30.0, 60.0]] * 3)
    deltas = torch.tensor([[0.5, -0.25, 10.0, -10.0], [0.0, 0.0, 0.0, 0.0], [-5.0, 0.0, 0.1, 0.2]])
    out = delta2bbox_ref(anchors, deltas)
    m = abs(math.log(0.016))
    assert abs(m - 4.135166556742356) < 1e-12
    cx, cy = 20.0 + 20.0 * 0.5, 40.0 + 40.0 * -0.25
    w, h = 20.0 * math.exp(m), 40.0 * math.exp(-m)
    torch.testing.assert_close(out[0], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    torch.testing.assert_close(out[1], anchors[1])
    clipped = delta2bbox_ref(anchors, deltas, max_shape=(50, 45))
    assert clipped[:, 0::2].min() >= 0 and clipped[:, 0::2].max() <= 45
    assert clipped[:, 1::2].min() >= 0 and clipped[:, 1::2].max() <= 50
    assert clipped[0, 2].item() == 45.0 and clipped[2, 0].item() == 0.0
    # encode/decode round trip
    gt = torch.tensor([[12.0, 18.0, 40.0, 70.0], [0.0, 0.0, 5.0, 9.0], [11.0, 21.0, 29.0, 59.0]])
    torch.testing.assert_close(delta2bbox_ref(anchors, bbox2delta_ref(anchors, gt)), gt, rtol=0, atol=1e-4)


def test_nms_rules_hand_case():
    # A (area 100); B: inter 50, union 100 -> IoU exactly 0.5 -> kept (strict >); C: IoU 0.6 with A -> suppressed
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 6.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms_ref(boxes, scores, 0.5).tolist() == [0, 1]
    # C first: suppresses A (IoU 0.6) and B (IoU 50/60)
    assert nms_ref(boxes, torch.tensor([0.5, 0.8, 0.9]), 0.5).tolist() == [2]
    # ties: stable descending order (the CUDA sort is unstable on ties; the reference picks input order)
    assert nms_ref(boxes, torch.tensor([0.7, 0.7, 0.7]), 0.5).tolist() == [0, 1]

    # multiclass: class-aware, strict score threshold, sorted by score, max_num
    sc = torch.tensor([
        [0.90, 0.05, 0.00],    # A: class 0 fires; class 1 == 0.05 exactly -> not a candidate
        [0.80, 0.00, 0.30],    # B: class 0 kept (IoU == thr with A); class 2 alone
        [0.70, 0.0501, 0.00],  # C: class 0 suppressed by A; class 1 kept (no other class-1 box)
    ])
    dets, labels, inds = multiclass_nms_ref(boxes, sc, 0.05, 0.5, 100, return_inds=True)
    assert labels.tolist() == [0, 0, 2, 1]
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.90, 0.80, 0.30, 0.0501]))
    assert torch.equal(dets[:, :4], boxes[[0, 1, 1, 2]])
    assert inds.tolist() == [0 * 3 + 0, 1 * 3 + 0, 1 * 3 + 2, 2 * 3 + 1]
    dets2, labels2 = multiclass_nms_ref(boxes, sc, 0.05, 0.5, max_num=2)
    assert labels2.tolist() == [0, 0] and dets2.shape == (2, 5)
    d0, l0 = multiclass_nms_ref(boxes, torch.full((3, 3), 0.05), 0.05, 0.5, 100)
    assert d0.shape == (0, 5) and l0.shape == (0,)
    # class-specific boxes (N, 4*C)
    dets3, labels3 = multiclass_nms_ref(boxes.repeat(1, 3), sc, 0.05, 0.5, 100)
    assert torch.equal(dets3, dets) and torch.equal(labels3, labels)


def test_batched_nms_split_path_matches():
    g = torch.Generator().manual_seed(0)
    n = 400
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, 5, (n,), generator=g)
    d1, k1 = batched_nms_ref(boxes, scores, idxs, 0.5)
    d2, k2 = batched_nms_ref(boxes, scores, idxs, 0.5, split_thr=0)
    assert torch.equal(k1, k2) and torch.equal(d1, d2)
    assert (d1[1:, 4] <= d1[:-1, 4]).all()
    # per class, no kept pair overlaps with IoU > 0.5
    for c in range(5):
        kb = boxes[k1[idxs[k1] == c]]
        for i in range(len(kb)):
            lt = torch.maximum(kb[i, :2], kb[:, :2])
            rb = torch.minimum(kb[i, 2:], kb[:, 2:])
            inter = (rb - lt).clamp(min=0).prod(1)
            area = (kb[:, 2:] - kb[:, :2]).prod(1)
            iou = inter / (area[i] + area - inter)
            iou[i] = 0
            assert iou.max() <= 0.5


def test_saved_detector_simple_test(tmp_path):
    path = tmp_path / "retina_ti.pth"
    model = save_random_detector("retinanet_lit_ti", str(path), seed=0)
    assert not model.training
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    assert ckpt["meta"]["mmdet_version"] == "2.11.0"
    assert tuple(ckpt["meta"]["CLASSES"]) == COCO_CLASSES and len(COCO_CLASSES) == 80
    sd = ckpt["state_dict"]
    assert {k.split(".")[0] for k in sd} == {"backbone", "neck", "bbox_head"}
    # the backbone is the same random backbone save_random_checkpoint builds for the same seed
    bb = save_random_checkpoint("lit_ti", None, seed=0)
    for k, v in bb.state_dict().items():
        assert torch.equal(sd["backbone." + k], v), k
    assert sd["backbone.patch_embed2.dconv.conv_offset.weight"].abs().sum() > 0
    # reload into a fresh model
    fresh = RetinaNetRef("lit_ti")
    fresh.load_state_dict(sd, strict=True)
    fresh.eval()

    torch.manual_seed(0)
    img = torch.randn(1, 3, 256, 384)
    img_shape = (250, 380, 3)
    sf = np.array([1.25, 1.2, 1.25, 1.2], np.float32)
    boxes, scores, labels, raw = retinanet_simple_test_ref(fresh, img, img_shape, sf, return_raw=True)
    # top-1000 per level for levels with more anchors: 32x48x9 and 16x24x9 -> 1000 each; 8x12x9=864, 216, 54
    assert raw["scores"].shape == (1000 + 1000 + 864 + 216 + 54, 80)
    assert 0 < boxes.shape[0] <= 100
    assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape
    assert (scores > 0.05).all() and (scores[1:] <= scores[:-1]).all()
    assert labels.min() >= 0 and labels.max() < 80
    eps = 1e-4
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 380 / 1.25 + eps
    assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= 250 / 1.2 + eps
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
    # the saved model and the reloaded one agree
    b2, s2, l2 = retinanet_simple_test_ref(model, img, img_shape, sf)
    assert torch.equal(b2, boxes) and torch.equal(s2, scores) and torch.equal(l2, labels)
