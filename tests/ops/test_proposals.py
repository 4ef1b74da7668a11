"""lit_jax.ops.proposals.rpn_proposals against a plain torch/numpy transcription of mmdet 2.11
``RPNHead._get_bboxes`` + mmcv 1.3 ``batched_nms`` (offset trick, greedy kernel rule ``inter > thr * union``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lit_jax.ops.anchors import multilevel_anchors, rpn_anchor_config
from lit_jax.ops.proposals import rpn_proposals

F32 = np.float32


# ---- reference -------------------------------------------------------------------------------------------------
def ref_decode(anchors, deltas, img_hw):
    """mmdet 2.11 delta2bbox (means 0, stds 1, clip_border) in torch float32."""
    rois, d = torch.from_numpy(anchors), torch.from_numpy(deltas)
    dx, dy, dw, dh = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
    max_ratio = float(np.abs(np.log(16 / 1000)))
    dw = dw.clamp(min=-max_ratio, max=max_ratio)
    dh = dh.clamp(min=-max_ratio, max=max_ratio)
    px = (rois[:, 0] + rois[:, 2]) * 0.5
    py = (rois[:, 1] + rois[:, 3]) * 0.5
    pw = rois[:, 2] - rois[:, 0]
    ph = rois[:, 3] - rois[:, 1]
    gw = pw * dw.exp()
    gh = ph * dh.exp()
    gx = px + pw * dx
    gy = py + ph * dy
    b = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1)
    max_xy = torch.tensor([img_hw[1], img_hw[0], img_hw[1], img_hw[0]], dtype=torch.float32)
    b = torch.where(b < 0, torch.zeros(()), b)
    b = torch.where(b > max_xy, max_xy, b)
    return b.numpy()


def kernel_suppress(a, b, thr):
    """mmcv devIoU (offset 0), float32: box a (4,) against boxes b (M, 4)."""
    w = np.maximum(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), F32(0))
    h = np.maximum(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), F32(0))
    inter = w * h
    sa = (a[2] - a[0]) * (a[3] - a[1])
    sb = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter > F32(thr) * (sa + sb - inter)


def greedy(boxes, scores, thr):
    """Greedy NMS, descending score, ties to the lower row; returns kept rows in order."""
    order = np.argsort(-scores, kind="stable")
    sup = np.zeros(len(order), bool)
    keep = []
    for ii, i in enumerate(order):
        if sup[ii]:
            continue
        keep.append(i)
        sup[ii + 1:] |= kernel_suppress(boxes[i], boxes[order[ii + 1:]], thr)
    return np.array(keep, np.int64)


def ref_rpn_proposals(logits, deltas, anchors, img_hw, nms_pre, max_per_img, thr, offset_trick=True):
    """Returns (boxes (n, 4), scores (n,)) with n <= max_per_img, and the number of NMS survivors."""
    s_all, d_all, a_all, id_all = [], [], [], []
    for lvl, (lg, d, a) in enumerate(zip(logits, deltas, anchors)):
        s = torch.sigmoid(torch.from_numpy(lg))
        if 0 < nms_pre < s.shape[0]:
            s, idx = torch.sort(s, descending=True, stable=True)  # ties: lower index first (CUDA: unspecified)
            s, idx = s[:nms_pre], idx[:nms_pre].numpy()
            d, a = d[idx], a[idx]
        s_all.append(s.numpy())
        d_all.append(d)
        a_all.append(a)
        id_all.append(np.full(len(s), lvl, np.int64))
    scores = np.concatenate(s_all)
    ids = np.concatenate(id_all)
    boxes = ref_decode(np.concatenate(a_all), np.concatenate(d_all), img_hw)
    if offset_trick:  # mmcv batched_nms: boxes + id * (max + 1), float32
        nms_boxes = boxes + (ids.astype(F32) * (boxes.max() + F32(1)))[:, None]
        keep = greedy(nms_boxes, scores, thr)
    else:  # plain NMS within each level
        keep = np.concatenate([np.nonzero(ids == l)[0][greedy(boxes[ids == l], scores[ids == l], thr)]
                               for l in np.unique(ids)])
        keep = keep[np.lexsort((keep, -scores[keep]))]
    n_survivors = len(keep)
    keep = keep[:max_per_img]
    return boxes[keep], scores[keep], n_survivors


# ---- data ------------------------------------------------------------------------------------------------------
CANVAS = (128, 160)  # RPN levels (32, 40), (16, 20), (8, 10), (4, 5), (2, 3): 3840, 960, 240, 60, 18 anchors


def make_inputs(seed, *, ties):
    rng = np.random.default_rng(seed)
    anchors = multilevel_anchors(CANVAS, **rpn_anchor_config()._asdict())
    logits, deltas = [], []
    for a in anchors:
        n = a.shape[0]
        if ties:  # 80 distinct values: many exact ties, also at the nms_pre cut
            lg = rng.integers(-40, 40, n).astype(F32) / F32(8)
        else:  # all distinct, well separated after the sigmoid
            lg = rng.permutation(np.linspace(-6, 6, n, dtype=F32))
        logits.append(lg.astype(F32))
        deltas.append((rng.standard_normal((n, 4)) * 0.3).astype(F32))
    return logits, deltas, anchors


def run(logits, deltas, anchors, img_hw, **kw):
    fn = jax.jit(lambda lg, d, hw: rpn_proposals(lg, d, anchors, hw, **kw))
    boxes, scores, valid = fn([jnp.asarray(x) for x in logits], [jnp.asarray(x) for x in deltas],
                              jnp.asarray(img_hw, jnp.float32))
    return np.asarray(boxes), np.asarray(scores), np.asarray(valid)


def check(got, want):
    boxes, scores, valid = got
    wb, ws, _ = want
    n = len(ws)
    assert valid.sum() == n and valid[:n].all()
    np.testing.assert_allclose(boxes[:n], wb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores[:n], ws, rtol=1e-6, atol=0)
    assert np.all(boxes[n:] == 0) and np.all(scores[n:] == 0)


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("nms_pre,max_per_img", [(300, 200), (1000, 2000)])
def test_rpn_proposals_match_reference(ties, nms_pre, max_per_img):
    """Several levels, some larger than nms_pre (sorted + cut) and some smaller (kept whole); with (300, 200)
    more survivors than max_per_img (cut across levels), with (1000, 2000) fewer (invalid slots)."""
    logits, deltas, anchors = make_inputs(0 if ties else 1, ties=ties)
    img_hw = (120.0, 150.0)  # smaller than the canvas: the clip matters
    want = ref_rpn_proposals(logits, deltas, anchors, img_hw, nms_pre, max_per_img, 0.7)
    got = run(logits, deltas, anchors, img_hw, nms_pre=nms_pre, max_per_img=max_per_img, iou_thr=0.7)
    check(got, want)
    if max_per_img == 200:
        assert want[2] > max_per_img  # the cut across levels is exercised
    else:
        assert want[2] < max_per_img  # some slots stay empty
    # On this data the offset trick is the same as plain per-level NMS.
    plain = ref_rpn_proposals(logits, deltas, anchors, img_hw, nms_pre, max_per_img, 0.7, offset_trick=False)
    np.testing.assert_array_equal(plain[0], want[0])


def test_nms_is_per_level():
    """Two levels with identical anchors, deltas and logits: per-level NMS keeps both copies of every box."""
    rng = np.random.default_rng(5)
    a = multilevel_anchors((64, 64), strides=(8,), scales=(8.0,), ratios=(0.5, 1.0, 2.0))[0]
    lg = rng.permutation(np.linspace(-3, 3, a.shape[0], dtype=F32))
    d = (rng.standard_normal((a.shape[0], 4)) * 0.2).astype(F32)
    single = run([lg], [d], [a], (64.0, 64.0), nms_pre=1000, max_per_img=500)
    double = run([lg, lg], [d, d], [a, a], (64.0, 64.0), nms_pre=1000, max_per_img=500)
    n = int(single[2].sum())
    assert 0 < n < a.shape[0]  # NMS removed some
    assert int(double[2].sum()) == 2 * n
    np.testing.assert_array_equal(double[0][0:2 * n:2], single[0][:n])  # equal scores: level 0 first
    np.testing.assert_array_equal(double[0][1:2 * n:2], single[0][:n])
    check(double, ref_rpn_proposals([lg, lg], [d, d], [a, a], (64.0, 64.0), 1000, 500, 0.7))


def test_zero_area_proposals_are_kept():
    """No min-size filter: anchors beyond the image clip to zero-width boxes, which are kept and never
    suppress each other."""
    a = np.array([[200, 10, 220, 30], [205, 12, 225, 32], [210, 10, 230, 30], [10, 10, 40, 40]], F32)
    lg = np.array([3.0, 2.0, 1.0, 0.0], F32)
    d = np.zeros((4, 4), F32)
    boxes, scores, valid = run([lg], [d], [a], (100.0, 100.0), nms_pre=1000, max_per_img=8)
    assert valid.sum() == 4
    np.testing.assert_array_equal(boxes[:3, [0, 2]], 100.0)
    check((boxes, scores, valid), ref_rpn_proposals([lg], [d], [a], (100.0, 100.0), 1000, 8, 0.7))


def test_vmap_over_batch():
    """Batched (vmap) == per image, with per-image img_shape."""
    imgs = [make_inputs(s, ties=True) for s in (2, 3)]
    anchors = imgs[0][2]
    shapes = np.array([[120.0, 150.0], [100.0, 160.0]], F32)
    kw = dict(nms_pre=300, max_per_img=200, iou_thr=0.7)
    logits = [jnp.stack([jnp.asarray(i[0][l]) for i in imgs]) for l in range(len(anchors))]
    deltas = [jnp.stack([jnp.asarray(i[1][l]) for i in imgs]) for l in range(len(anchors))]
    fn = jax.jit(jax.vmap(lambda lg, d, hw: rpn_proposals(lg, d, anchors, hw, **kw)))
    boxes, scores, valid = (np.asarray(x) for x in fn(logits, deltas, jnp.asarray(shapes)))
    for b, (lg, d, _) in enumerate(imgs):
        want = ref_rpn_proposals(lg, d, anchors, tuple(shapes[b]), 300, 200, 0.7)
        check((boxes[b], scores[b], valid[b]), want)
