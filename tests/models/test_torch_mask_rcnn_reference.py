"""Checks of the PyTorch Mask R-CNN reference in third_party/lit_torch (parity spec sections 8-10, 12, 13)."""
import math

import numpy as np
import pytest
import torch

from third_party.lit_torch import (
    FCNMaskHead,
    MaskRCNNRef,
    Shared2FCBBoxHead,
    count_params,
    map_roi_levels_ref,
    mask_rcnn_simple_test_ref,
    multilevel_roi_align_ref,
    paste_masks_ref,
    rcnn_get_bboxes_ref,
    roi_align_ref,
    rpn_anchors_ref,
    save_random_checkpoint,
    save_random_detector,
)
from third_party.lit_torch.save_detector import COCO_CLASSES

torch.set_num_threads(1)

# spec section 13
COUNTS = {
    "lit_ti": dict(backbone=19_371_736, neck=2_623_488, rpn=593_935, roi=16_949_985, total=39_539_144),
    "lit_s": dict(backbone=27_966_192, neck=2_729_984, rpn=593_935, roi=16_949_985, total=48_240_096),
}
C2_C5 = {"lit_ti": (64, 128, 320, 512), "lit_s": (96, 192, 384, 768)}


def _conv(prefix, o, i, k):
    return {f"{prefix}.weight": (o, i, k, k), f"{prefix}.bias": (o,)}


def _fc(prefix, o, i):
    return {f"{prefix}.weight": (o, i), f"{prefix}.bias": (o,)}


def expected_neck_heads(chans):
    """neck.*, rpn_head.*, roi_head.* keys and shapes, written out from spec section 12 'Mask R-CNN'."""
    exp = {}
    for i, c in enumerate(chans):
        exp.update(_conv(f"neck.lateral_convs.{i}.conv", 256, c, 1))
        exp.update(_conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3))
    exp.update(_conv("rpn_head.rpn_conv", 256, 256, 3))
    exp.update(_conv("rpn_head.rpn_cls", 3, 256, 1))
    exp.update(_conv("rpn_head.rpn_reg", 12, 256, 1))
    exp.update(_fc("roi_head.bbox_head.shared_fcs.0", 1024, 12544))
    exp.update(_fc("roi_head.bbox_head.shared_fcs.1", 1024, 1024))
    exp.update(_fc("roi_head.bbox_head.fc_cls", 81, 1024))
    exp.update(_fc("roi_head.bbox_head.fc_reg", 320, 1024))
    for i in range(4):
        exp.update(_conv(f"roi_head.mask_head.convs.{i}.conv", 256, 256, 3))
    exp["roi_head.mask_head.upsample.weight"] = (256, 256, 2, 2)  # ConvTranspose2d: [in, out, kh, kw]
    exp["roi_head.mask_head.upsample.bias"] = (256,)
    exp.update(_conv("roi_head.mask_head.conv_logits", 80, 256, 1))
    return exp


@pytest.mark.parametrize("name", ["lit_ti", "lit_s"])
def test_param_counts_and_keys(name):
    torch.manual_seed(0)
    m = MaskRCNNRef(name)
    exp = COUNTS[name]
    assert count_params(m.backbone) == exp["backbone"]
    assert count_params(m.neck) == exp["neck"]
    assert count_params(m.rpn_head) == exp["rpn"]
    assert count_params(m.roi_head) == exp["roi"]
    assert count_params(m.roi_head.bbox_head) == 14_306_705
    assert count_params(m.roi_head.mask_head) == 2_643_280
    assert count_params(m) == exp["total"] == exp["backbone"] + exp["neck"] + exp["rpn"] + exp["roi"]
    assert count_params(m) == sum(p.numel() for p in m.parameters())
    sd = m.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("backbone.")}
    assert got == expected_neck_heads(C2_C5[name])
    assert all(k.startswith(("backbone.", "neck.", "rpn_head.", "roi_head.")) for k in sd)
    # the backbone keys are those of the bare detection backbone
    bb = save_random_checkpoint(name, None, seed=0)
    assert {k[len("backbone."):] for k in sd if k.startswith("backbone.")} == set(bb.state_dict())


def test_heads_forward_shapes_and_flatten_order():
    torch.manual_seed(0)
    bh = Shared2FCBBoxHead()
    x = torch.randn(3, 256, 7, 7)
    cls, reg = bh(x)
    assert cls.shape == (3, 81) and reg.shape == (3, 320)
    # C,H,W flatten: shared_fcs.0 column c*49 + h*7 + w reads x[:, c, h, w]
    with torch.no_grad():
        ref = torch.relu(x.reshape(3, -1) @ bh.shared_fcs[0].weight.T + bh.shared_fcs[0].bias)
        ref = torch.relu(bh.shared_fcs[1](ref))
        assert torch.allclose(bh.fc_cls(ref), cls, atol=1e-5)
        col = 5 * 49 + 2 * 7 + 3
        w0 = torch.zeros_like(bh.shared_fcs[0].weight)
        w0[:, col] = 1.0
        assert torch.equal((x.flatten(1) @ w0.T)[:, 0], x[:, 5, 2, 3])
    mh = FCNMaskHead()
    assert mh(torch.randn(2, 256, 14, 14)).shape == (2, 80, 28, 28)
    # ConvTranspose2d(k2, s2): out[2i + a, 2j + b] = sum_c x[c, i, j] * W[c, o, a, b] + bias
    with torch.no_grad():
        y = torch.randn(1, 256, 3, 3)
        up = mh.upsample(y)
        o, i, j, a, b = 7, 1, 2, 1, 0
        exp = (y[0, :, i, j] * mh.upsample.weight[:, o, a, b]).sum() + mh.upsample.bias[o]
        assert torch.allclose(up[0, o, 2 * i + a, 2 * j + b], exp, atol=1e-5)


def test_rpn_anchors():
    a = rpn_anchors_ref([(2, 3), (1, 2)])
    assert a[0].shape == (2 * 3 * 3, 4) and a[1].shape == (1 * 2 * 3, 4)
    # stride 4, scale 8: base 32; ratio 1 -> (-16, -16, 16, 16); ratio 0.5 -> w 32*sqrt(2), h 32/sqrt(2)
    assert torch.allclose(a[0][1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    assert torch.allclose(a[0][0], torch.tensor([-16 * math.sqrt(2), -8 * math.sqrt(2), 16 * math.sqrt(2),
                                                  8 * math.sqrt(2)]), atol=1e-4)
    # flat order (y*W + x)*A + a: row 3 is x=1, y=0, a=0 -> shifted by (4, 0)
    assert torch.allclose(a[0][3], a[0][0] + torch.tensor([4.0, 0.0, 4.0, 0.0]))
    assert torch.allclose(a[0][9], a[0][0] + torch.tensor([0.0, 4.0, 0.0, 4.0]))
    assert torch.allclose(a[1][1], torch.tensor([-32.0, -32.0, 32.0, 32.0]))


# ----------------------------------------------------------------------------------------------------------------
# RoIAlign
H, W = 6, 8


def ramp():
    """f(y, x) = 10 + 3y + x on a 6x8 map: bilinear interpolation of it is exact inside [0, 5] x [0, 7]."""
    y = torch.arange(H, dtype=torch.float32)[:, None]
    x = torch.arange(W, dtype=torch.float32)[None, :]
    return (10 + 3 * y + x)[None, None]


def test_roi_align_interior_adaptive_grid():
    f = ramp()
    # scale 0.5, aligned: feature box x 0.5..4.5, y 0.5..3.5; 2x2 bins of 1.5 (h) x 2 (w);
    # adaptive grids ceil(3/2) = 2 x ceil(4/2) = 2
    out = roi_align_ref(f, torch.tensor([[0.0, 2.0, 2.0, 10.0, 8.0]]), 2, 0.5)
    exp = torch.tensor([[10 + 3 * (0.5 + (ph + 0.5) * 1.5) + (0.5 + (pw + 0.5) * 2.0) for pw in range(2)]
                        for ph in range(2)])
    assert torch.allclose(out[0, 0], exp, atol=1e-5)
    # aligned=False: no -0.5 (box 1..5 x 1..4)
    out = roi_align_ref(f, torch.tensor([[0.0, 2.0, 2.0, 10.0, 8.0]]), 2, 0.5, aligned=False)
    exp = torch.tensor([[10 + 3 * (1.0 + (ph + 0.5) * 1.5) + (1.0 + (pw + 0.5) * 2.0) for pw in range(2)]
                        for ph in range(2)])
    assert torch.allclose(out[0, 0], exp, atol=1e-5)


def test_roi_align_border_rules():
    f = ramp()
    # scale 1, aligned. Roi A: y -1..1 -> feature -1.5..0.5, 2 bins of 1, grid 1: samples at y = -1 and 0.
    # y = -1 exactly is NOT zeroed (mmcv zeroes only y < -1); it is clamped to row 0.
    # x 2..4 -> 1.5..3.5, 1 bin, grid 2: samples x = 2, 3 (mean f(0, 2.5) = 12.5).
    # Roi B: y -1.25..0.75 -> samples y = -1.25 (< -1: zero) and -0.25 (clamped to row 0).
    rois = torch.tensor([[0.0, 2.0, -1.0, 4.0, 1.0], [0.0, 2.0, -1.25, 4.0, 0.75]])
    out = roi_align_ref(f, rois, (2, 1), 1.0)
    assert out.shape == (2, 1, 2, 1)
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([12.5, 12.5]), atol=1e-6)
    assert torch.allclose(out[1, 0, :, 0], torch.tensor([0.0, 12.5]), atol=1e-6)
    # Roi C, partly outside bottom/right: x 5..11 -> 4.5..10.5 (bins of 3, grid 3: x 5,6,7 | 8,9,10),
    # y 4..8 -> 3.5..7.5 (bins of 2, grid 2: y 4,5 | 6,7). x = 8 = W and y = 6 = H are sampled (last column / row,
    # no interpolation); x 9, 10 > W and y 7 > H give 0 but still count in the mean (count = 6).
    out = roi_align_ref(f, torch.tensor([[0.0, 5.0, 4.0, 11.0, 8.0]]), 2, 1.0)
    fv = lambda y, x: 10 + 3 * y + x  # noqa: E731
    exp = torch.tensor([
        [np.mean([fv(y, x) for y in (4, 5) for x in (5, 6, 7)]), (fv(4, 7) + fv(5, 7)) / 6],
        [(fv(5, 5) + fv(5, 6) + fv(5, 7)) / 6, fv(5, 7) / 6],
    ], dtype=torch.float32)
    assert torch.allclose(exp, torch.tensor([[29.5, 61 / 6], [15.5, 32 / 6]]))
    assert torch.allclose(out[0, 0], exp, atol=1e-5)
    # a box entirely beyond the map -> 0; an empty (zero-size) aligned box -> no samples -> 0
    out = roi_align_ref(f, torch.tensor([[0.0, 20.0, 20.0, 30.0, 30.0], [0.0, 3.0, 3.0, 3.0, 3.0]]), 2, 1.0)
    assert torch.count_nonzero(out) == 0
    # batch index selects the image
    f2 = torch.cat([f, 2 * f], 0)
    r = torch.tensor([[1.0, 2.0, 2.0, 10.0, 8.0]])
    assert torch.allclose(roi_align_ref(f2, r, 2, 0.5), 2 * roi_align_ref(f, r * torch.tensor([0, 1, 1, 1, 1.0]),
                                                                            2, 0.5))


def test_map_roi_levels_thresholds():
    sizes = [10.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 1000.0]
    rois = torch.tensor([[0.0, 5.0, 7.0, 5.0 + s, 7.0 + s] for s in sizes])
    assert map_roi_levels_ref(rois).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # sqrt(w*h): a 56 x 224 box has scale 112 -> P3
    assert map_roi_levels_ref(torch.tensor([[0.0, 0.0, 0.0, 56.0, 224.0]])).tolist() == [1]


def test_multilevel_roi_align_routes_levels():
    torch.manual_seed(0)
    feats = [torch.randn(1, 4, 128 // s, 160 // s) for s in (4, 8, 16, 32)] + [torch.randn(1, 4, 2, 3)]
    rois = torch.tensor([[0.0, 3.0, 5.0, 60.0, 50.0],     # ~51 -> P2
                         [0.0, 10.0, 4.0, 150.0, 120.0],  # ~127 -> P3
                         [0.0, 0.0, 0.0, 159.0, 127.0],   # ~142 -> P3
                         [0.0, -100.0, -60.0, 200.0, 230.0]])  # ~295 -> P4
    lv = map_roi_levels_ref(rois)
    assert lv.tolist() == [0, 1, 1, 2]
    out = multilevel_roi_align_ref(feats, rois, 7)
    for i in range(4):
        exp = roi_align_ref(feats[lv[i]], rois[i:i + 1], 7, 1.0 / (4, 8, 16, 32)[lv[i]])
        assert torch.equal(out[i:i + 1], exp)
    rois5 = torch.tensor([[0.0, 0.0, 0.0, 500.0, 500.0]])
    assert map_roi_levels_ref(rois5).tolist() == [3]
    assert torch.equal(multilevel_roi_align_ref(feats, rois5, 14), roi_align_ref(feats[3], rois5, 14, 1 / 32))


# ----------------------------------------------------------------------------------------------------------------
# bbox post-processing and mask paste
def test_y2_zero_quirk_and_rescale():
    torch.manual_seed(0)
    rois = torch.tensor([[0.0, 10.0, 0.0, 40.0, 0.0],   # y2 == 0: logits and deltas zeroed
                         [0.0, 10.0, 5.0, 40.0, 30.0]])
    cls = torch.full((2, 81), -10.0)
    cls[:, 80] = 0.0
    cls[:, 3] = 5.0  # class 3 fires with ~0.99
    reg = torch.zeros(2, 320)
    reg[:, 12] = 1.0  # class 3 dx = 1 * 0.1
    img_shape = (50, 60, 3)
    sf = np.array([2.0, 1.25, 2.0, 1.25], np.float32)
    dets, labels, raw = rcnn_get_bboxes_ref(rois, cls, reg, img_shape, sf, return_raw=True)
    assert torch.allclose(raw["scores"][0], torch.full((81,), 1 / 81))
    assert dets.shape == (1, 5) and labels.tolist() == [3]
    # roi 1: w 30 -> dx 0.1 shifts x by 3: (13, 5, 43, 30), then / (2, 1.25)
    assert torch.allclose(dets[0, :4], torch.tensor([6.5, 4.0, 21.5, 24.0]), atol=1e-5)
    # without the quirk roi 0 (a zero-height box) fires too
    d2, _ = rcnn_get_bboxes_ref(rois, cls, reg, img_shape, sf, apply_y2_quirk=False)
    assert d2.shape[0] == 2


def test_paste_mask_rules():
    ones = torch.ones(1, 28, 28)
    # a 28-px box at integer corners: pixel centres inside -> 1, the sources at -1 / 28 of the neighbours -> 0
    m = paste_masks_ref(ones, torch.tensor([[10.0, 10.0, 38.0, 38.0]]), 50, 60)
    assert m.shape == (1, 50, 60)
    exp = torch.zeros(50, 60)
    exp[10:38, 10:38] = 1
    assert torch.allclose(m[0], exp, atol=1e-6)
    # half-pixel x corners: the border columns sample at -0.5 / 27.5 -> exactly 0.5 -> kept by '>= 0.5'
    m = paste_masks_ref(ones, torch.tensor([[10.5, 10.0, 38.5, 38.0]]), 50, 60)[0]
    assert m[20, 10].item() == 0.5 and m[20, 38].item() == 0.5 and m[20, 9].item() == 0 and m[20, 39].item() == 0
    assert ((m >= 0.5).sum(1)[20]).item() == 29
    # zero-width box: inf grid values become 0, i.e. the mask's centre column is pasted over the whole width
    probs = torch.zeros(1, 28, 28)
    probs[0, :, 13:15] = 1.0
    m = paste_masks_ref(probs, torch.tensor([[20.2, 10.0, 20.2, 38.0]]), 50, 60)[0]
    exp = torch.zeros(50, 60)
    exp[10:38] = 1
    assert torch.allclose(m, exp, atol=1e-5)  # (fp32 rounding of g away from the box corners)


# ----------------------------------------------------------------------------------------------------------------
def _iou(a, b):
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-6)


def test_saved_mask_rcnn_simple_test(tmp_path):
    path = tmp_path / "mrcnn_ti.pth"
    model = save_random_detector("mask_rcnn_lit_ti", str(path), seed=0)
    assert not model.training
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    assert ckpt["meta"]["mmdet_version"] == "2.11.0" and tuple(ckpt["meta"]["CLASSES"]) == COCO_CLASSES
    sd = ckpt["state_dict"]
    assert {k.split(".")[0] for k in sd} == {"backbone", "neck", "rpn_head", "roi_head"}
    bb = save_random_checkpoint("lit_ti", None, seed=0)
    for k, v in bb.state_dict().items():
        assert torch.equal(sd["backbone." + k], v), k
    fresh = MaskRCNNRef("lit_ti")
    fresh.load_state_dict(sd, strict=True)
    fresh.eval()

    torch.manual_seed(0)
    img = torch.randn(1, 3, 192, 256)
    ori_shape = (120, 167, 3)
    img_shape = (180, 251, 3)  # s = 1.5: int(167*1.5 + 0.5) = 251, int(120*1.5 + 0.5) = 180
    sf = np.array([251 / 167, 180 / 120, 251 / 167, 180 / 120], np.float32)
    boxes, scores, labels, masks, inter = mask_rcnn_simple_test_ref(fresh, img, img_shape, sf, ori_shape,
                                                                    return_intermediate=True)
    # RPN: candidates 48x64x3 -> 1000, 24x32x3 -> 1000, 12x16x3 = 576, 6x8x3 = 144, 3x4x3 = 36
    raw = inter["rpn_raw"]
    assert [tuple(c.shape) for c in inter["rpn_cls_scores"]] == [(1, 3, 48, 64), (1, 3, 24, 32), (1, 3, 12, 16),
                                                                (1, 3, 6, 8), (1, 3, 3, 4)]
    assert raw["scores"].shape == (1000 + 1000 + 576 + 144 + 36,)
    props = inter["proposals"]
    assert props.shape == (1000, 5)
    assert (props[1:, 4] <= props[:-1, 4]).all()
    assert props[:, 0::2].min() >= 0 and props[:, 0::2].max() <= 251 and props[:, 3].max() <= 180
    # NMS is per level: kept proposals of one level overlap by at most 0.7
    lv = raw["level_ids"][raw["keep"]]
    for level in range(5):
        p = props[lv == level, :4]
        if p.shape[0] > 1:
            iou = _iou(p, p)
            iou.fill_diagonal_(0)
            assert iou.max() <= 0.7 + 1e-6
    assert inter["cls_score"].shape == (1000, 81) and inter["bbox_pred"].shape == (1000, 320)
    # detections
    K = boxes.shape[0]
    assert 0 < K <= 100
    assert scores.shape == (K,) and labels.shape == (K,) and masks.shape == (K, 120, 167)
    assert masks.dtype == torch.bool
    assert (scores > 0.05).all() and (scores[1:] <= scores[:-1]).all()
    assert labels.min() >= 0 and labels.max() < 80
    eps = 1e-3
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 251 / sf[0] + eps
    assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= 180 / sf[1] + eps
    # masks: M = K valid mask RoIs (no rescaled y2 == 0 here), some non-empty, all near their boxes
    assert inter["mask_valid"].all() and inter["mask_pred"].shape == (K, 80, 28, 28)
    assert torch.allclose(inter["mask_rois"][:, 1:], boxes * torch.from_numpy(sf))
    assert masks.flatten(1).any(1).sum() >= K // 2
    ys = torch.arange(120, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(167, dtype=torch.float32)[None, :] + 0.5
    for k in range(K):
        x0, y0, x1, y1 = boxes[k].tolist()
        mx, my = (x1 - x0) / 56 + 1e-3, (y1 - y0) / 56 + 1e-3  # half a mask cell
        inside = (xs > x0 - mx) & (xs < x1 + mx) & (ys > y0 - my) & (ys < y1 + my)
        assert not (masks[k] & ~inside).any()
    # the label channel is the one pasted
    k = 0
    probs = inter["mask_pred"][k, labels[k]].sigmoid()
    assert torch.allclose(inter["mask_probs"][k], probs)
    # the saved model and the reloaded one agree; fixed proposals reproduce the RoI stage
    b2, s2, l2, m2 = mask_rcnn_simple_test_ref(model, img, img_shape, sf, ori_shape)
    assert torch.equal(b2, boxes) and torch.equal(s2, scores) and torch.equal(l2, labels) and torch.equal(m2, masks)
    b3, s3, l3, m3 = mask_rcnn_simple_test_ref(fresh, img, img_shape, sf, ori_shape, proposals=props)
    assert torch.equal(b3, boxes) and torch.equal(s3, scores) and torch.equal(m3, masks)
    # detections whose rescaled y2 is exactly 0 keep their box but are dropped from the mask branch
    with torch.no_grad():
        fresh.roi_head.bbox_head.fc_reg.bias[1] = -50.0  # class 0: dy * 0.1 = -5 -> the box leaves the top, y2 -> 0
        fresh.roi_head.bbox_head.fc_cls.bias[0] = 10.0
    props = torch.tensor([[10.0, 0.0, 40.0, 2.0, 0.9], [50.0, 20.0, 90.0, 70.0, 0.8]])
    b4, s4, l4, m4, it4 = mask_rcnn_simple_test_ref(fresh, img, img_shape, sf, ori_shape, proposals=props,
                                                    return_intermediate=True)
    assert b4.shape[0] >= 2 and (l4[:2] == 0).all() and (b4[:2, 3] == 0).all()
    assert not it4["mask_valid"][:2].any() and not m4[:2].any()
    assert it4["mask_rois"].shape[0] == int(it4["mask_valid"].sum())
