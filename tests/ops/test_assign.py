"""lit_jax.ops.assign against a torch transcription of mmdet 2.11 MaxIoUAssigner (loop over gts)."""
import jax
import numpy as np
import pytest
import torch

from lit_jax.ops.assign import max_iou_assign, random_sample


def ref_overlaps(gt, anchors):
    a1 = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    a2 = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    lt = torch.max(gt[:, None, :2], anchors[None, :, :2])
    rb = torch.min(gt[:, None, 2:], anchors[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    ov = wh[..., 0] * wh[..., 1]
    return ov / torch.max(a1[:, None] + a2[None, :] - ov, torch.tensor([1e-6]))


def ref_assign(anchors, gt, gt_valid, anchor_valid, pos, neg, min_pos, low_quality=True, all_max=True):
    """mmdet semantics: drop invalid anchors and padded gts, run assign_wrt_overlaps, map codes back
    (mmdet gt_inds k>0 -> k-1, 0 -> -1, -1 -> -2; filtered anchors -> -2)."""
    anchors = torch.as_tensor(anchors)
    gt = torch.as_tensor(gt)[torch.as_tensor(gt_valid)]
    gt_ids = np.nonzero(gt_valid)[0]
    inside = np.nonzero(anchor_valid)[0]
    a = anchors[torch.as_tensor(inside)]
    out = np.full(anchors.shape[0], -2, np.int64)
    num_gts, num_b = gt.shape[0], a.shape[0]
    inds = torch.full((num_b,), -1, dtype=torch.long)
    if num_gts == 0:
        inds[:] = 0
    elif num_b > 0:
        ov = ref_overlaps(gt, a)
        max_ov, argmax_ov = ov.max(dim=0)
        gt_max, gt_argmax = ov.max(dim=1)
        inds[(max_ov >= 0) & (max_ov < neg)] = 0
        p = max_ov >= pos
        inds[p] = argmax_ov[p] + 1
        if low_quality:
            for i in range(num_gts):
                if gt_max[i] >= min_pos:
                    if all_max:
                        inds[ov[i, :] == gt_max[i]] = i + 1
                    else:
                        inds[gt_argmax[i]] = i + 1
    inds = inds.numpy()
    mapped = np.where(inds > 0, gt_ids[np.maximum(inds - 1, 0)] if len(gt_ids) else -2,
                      np.where(inds == 0, -1, -2))
    out[inside] = mapped
    return out


RETINA = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)
RPN = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
RCNN = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5)


_assign_jit = jax.jit(max_iou_assign, static_argnames=(
    "pos_iou_thr", "neg_iou_thr", "min_pos_iou", "match_low_quality", "gt_max_assign_all"))
_sample_jit = jax.jit(random_sample, static_argnames=("num", "pos_fraction"))


def check(anchors, gt, gt_valid, anchor_valid=None, all_max=True, low_quality=True, **cfg):
    n = anchors.shape[0]
    av = np.ones(n, bool) if anchor_valid is None else anchor_valid
    got = _assign_jit(anchors, gt, gt_valid, anchor_valid=av, gt_max_assign_all=all_max,
                      match_low_quality=low_quality, **cfg)
    want = ref_assign(anchors, gt, gt_valid, av, cfg["pos_iou_thr"], cfg["neg_iou_thr"], cfg["min_pos_iou"],
                      low_quality=low_quality, all_max=all_max)
    np.testing.assert_array_equal(np.asarray(got.assigned_gt), want)
    return np.asarray(got.assigned_gt)


def grid(n=12, step=10.0, size=16.0):
    c = np.arange(n) * step
    xx, yy = np.meshgrid(c, c)
    ctr = np.stack([xx.ravel(), yy.ravel()], -1)
    return np.concatenate([ctr - size / 2, ctr + size / 2], -1).astype(np.float32)


@pytest.mark.parametrize("cfg", [RETINA, RPN, RCNN])
def test_random_scenes(cfg):
    rng = np.random.default_rng(0)
    anchors = grid()
    for trial in range(4):
        g = 6
        xy = rng.uniform(-10, 110, size=(g, 2))
        wh = rng.uniform(2, 40, size=(g, 2))
        gt = np.concatenate([xy, xy + wh], -1).astype(np.float32)
        gt[1] = gt[0]  # duplicate gt: argmax ties go to the lower index, low-quality to the later one
        gv = np.ones(g, bool)
        gv[-1] = trial % 2 == 0  # padded row
        av = rng.uniform(size=anchors.shape[0]) > 0.2
        check(anchors, gt, gv, av, **cfg)
        check(anchors, gt, gv, None, **cfg)
        check(anchors, gt, gv, av, all_max=False, **cfg)


def test_empty_gt_all_negative():
    anchors = grid(4)
    gt = np.zeros((3, 4), np.float32)
    av = np.ones(16, bool)
    av[3] = False
    got = check(anchors, gt, np.zeros(3, bool), av, **RETINA)
    assert (got[av] == -1).all() and got[3] == -2
    res = max_iou_assign(anchors, np.zeros((0, 4), np.float32), np.zeros(0, bool), **RETINA)
    assert (np.asarray(res.assigned_gt) == -1).all()


def test_low_quality_zero_iou_quirk_and_ties():
    # anchors [0,10]x[0,10] and [20,30]x[0,10]; a gt far away has max IoU 0 -> every anchor with IoU 0
    # to it becomes its positive under RetinaNet (min_pos_iou=0), overwriting earlier assignments.
    anchors = np.float32([[0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 10, 10]])
    gt = np.float32([[0, 0, 10, 10], [500, 500, 510, 510]])
    got = check(anchors, gt, np.ones(2, bool), **RETINA)
    # anchor 0 and 2 have IoU 1 with gt0 (its max, tie -> both) but IoU 0 with gt1 == gt1's max (0):
    # gt1 is later, so it overwrites everything.
    np.testing.assert_array_equal(got, [1, 1, 1])
    got = check(anchors, gt, np.ones(2, bool), **RPN)  # min_pos_iou 0.3 blocks gt1
    np.testing.assert_array_equal(got, [0, -1, 0])
    # padded gt never matches, even though its IoU would be 0 == its max
    got = check(anchors, gt, np.array([True, False]), **RETINA)
    np.testing.assert_array_equal(got, [0, -1, 0])


def test_threshold_equality():
    # IoU exactly 0.5 (>= pos) is positive; exactly 0.4 (not < neg) is ignored.
    anchors = np.float32([[0, 0, 10, 10], [0, 0, 10, 10], [100, 100, 110, 110]])
    gt = np.float32([[0, 0, 10, 5], [200, 200, 210, 210]])
    got = check(anchors[:1], gt[:1], np.ones(1, bool), low_quality=False, **RETINA)
    np.testing.assert_array_equal(got, [0])
    gt4 = np.float32([[0, 0, 10, 4]])
    got = check(anchors[:1], gt4, np.ones(1, bool), low_quality=False, **RETINA)
    np.testing.assert_array_equal(got, [-2])
    got = check(anchors, gt4, np.ones(1, bool), low_quality=True, **RETINA)
    np.testing.assert_array_equal(got, [0, 0, -1])  # both tied anchors reach gt's max 0.4
    # invalid anchors take no part in a gt's max: the best valid anchor gets the gt.
    av = np.array([False, False, True])
    got = check(anchors, gt4, np.ones(1, bool), av, low_quality=True, **RETINA)
    np.testing.assert_array_equal(got, [-2, -2, 0])  # IoU 0 == gt max over valid anchors


def test_sample():
    key = jax.random.PRNGKey(0)
    n = 1000
    rng = np.random.default_rng(0)
    for n_pos, n_neg in [(300, 600), (20, 900), (0, 100), (5, 10)]:
        perm = rng.permutation(n)
        pos = np.zeros(n, bool)
        neg = np.zeros(n, bool)
        pos[perm[:n_pos]] = True
        neg[perm[n_pos:n_pos + n_neg]] = True
        r = _sample_jit(key, pos, neg, num=256, pos_fraction=0.5)
        idx, ok, isp = map(np.asarray, (r.indices, r.valid, r.is_pos))
        exp_pos = min(n_pos, 128)
        exp_neg = min(n_neg, 256 - exp_pos)
        assert int(r.num_pos) == exp_pos and int(r.num_neg) == exp_neg
        assert isp[:exp_pos].all() and not isp[exp_pos:].any()
        assert ok[:exp_pos + exp_neg].all() and not ok[exp_pos + exp_neg:].any()
        assert pos[idx[:exp_pos]].all() and neg[idx[exp_pos:exp_pos + exp_neg]].all()
        sel = idx[ok]
        assert len(np.unique(sel)) == len(sel)
        assert (np.diff(idx[:exp_pos]) > 0).all() and (np.diff(idx[exp_pos:exp_pos + exp_neg]) > 0).all()


def test_vmap_over_images():
    anchors = grid(6)
    gts = np.float32([[[0, 0, 20, 20], [30, 30, 45, 50], [0, 0, 0, 0]],
                      [[5, 5, 25, 15], [0, 0, 0, 0], [0, 0, 0, 0]]])
    gv = np.array([[True, True, False], [True, False, False]])
    av = np.ones((2, anchors.shape[0]), bool)
    av[1, :6] = False
    f = jax.vmap(lambda g, v, a: max_iou_assign(anchors, g, v, anchor_valid=a, **RPN).assigned_gt)
    got = np.asarray(jax.jit(f)(gts, gv, av))
    for i in range(2):
        np.testing.assert_array_equal(got[i], ref_assign(anchors, gts[i], gv[i], av[i], 0.7, 0.3, 0.3))
