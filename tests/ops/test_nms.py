"""lit_jax.ops.nms against plain greedy numpy NMS with the mmcv rules."""
import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.ops.nms import batched_nms, multiclass_nms, topk_per_level

F32 = np.float32


def kernel_suppress(a, b, thr):
    """mmcv devIoU (offset 0): one box a (4,) against boxes b (M, 4), numpy float32."""
    left, right = np.maximum(a[0], b[:, 0]), np.minimum(a[2], b[:, 2])
    top, bottom = np.maximum(a[1], b[:, 1]), np.minimum(a[3], b[:, 3])
    w = np.maximum(right - left, F32(0))
    h = np.maximum(bottom - top, F32(0))
    inter = w * h
    sa = (a[2] - a[0]) * (a[3] - a[1])
    sb = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter > F32(thr) * (sa + sb - inter)


def greedy(boxes, scores, thr):
    """Greedy NMS over the given rows; stable descending order; returns kept row numbers in order."""
    order = np.argsort(-scores, kind="stable")
    sup = np.zeros(len(order), bool)
    keep = []
    for ii, i in enumerate(order):
        if sup[ii]:
            continue
        keep.append(i)
        rest = order[ii + 1:]
        sup[ii + 1:] |= kernel_suppress(boxes[i], boxes[rest], thr)
    return np.array(keep, np.int64)


def ref_batched_nms(boxes, scores, labels, thr, score_thr=None, valid=None, offset=True):
    """mmcv batched_nms: filter, offset trick in fp32 (or plain per-class NMS), greedy."""
    boxes, scores = boxes.astype(F32), scores.astype(F32)
    cand = np.ones(len(scores), bool) if valid is None else valid.copy()
    if score_thr is not None:
        cand &= scores > F32(score_thr)
    idx = np.nonzero(cand)[0]
    if len(idx) == 0:
        return idx
    b, s, l = boxes[idx], scores[idx], labels[idx]
    if offset:
        ob = b + (l.astype(F32) * (b.max() + F32(1)))[:, None]
        return idx[greedy(ob, s, thr)]
    kept = []
    for c in np.unique(l):
        m = np.nonzero(l == c)[0]
        kept.extend(m[greedy(b[m], s[m], thr)])
    kept = np.array(kept)
    kept = kept[np.lexsort((kept, -s[kept]))]  # descending score, lower index first
    return idx[kept]


def run(boxes, scores, labels, thr, max_out, **kw):
    fn = jax.jit(lambda b, s, l: batched_nms(b, s, l, thr, max_out, **kw))
    idx, ok = fn(boxes, scores, labels)
    idx, ok = np.asarray(idx), np.asarray(ok)
    assert (ok[:ok.sum()]).all() and not ok[ok.sum():].any()
    return idx[ok]


def random_scene(rng, n, n_cls, w=300, h=200):
    xy = rng.uniform(0, [w, h], size=(n, 2))
    wh = rng.uniform(1, 60, size=(n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], -1).astype(F32)
    scores = rng.uniform(size=n).astype(F32)
    labels = rng.integers(0, n_cls, size=n)
    return boxes, scores, labels


def test_random_against_greedy_and_per_class():
    rng = np.random.default_rng(0)
    boxes, scores, labels = random_scene(rng, 300, 4)
    valid = rng.uniform(size=300) > 0.1
    want = ref_batched_nms(boxes, scores, labels, 0.5, score_thr=0.05, valid=valid)
    # the offset trick equals plain per-class NMS here (no fp32 borderline pairs in this scene)
    np.testing.assert_array_equal(want, ref_batched_nms(boxes, scores, labels, 0.5, 0.05, valid, offset=False))
    assert len(want) > 40
    # all kept (max_output larger than the result), multi-tile (tile 16) and single-tile paths
    for kw in [dict(tile_size=16), dict()]:
        got = run(boxes, scores, labels, 0.5, 400, score_threshold=0.05, valid=valid, **kw)
        np.testing.assert_array_equal(got, want)
    # more survivors than max_output: exact prefix
    got = run(boxes, scores, labels, 0.5, 25, score_threshold=0.05, valid=valid, tile_size=32)
    np.testing.assert_array_equal(got, want[:25])
    # budget smaller than the candidate count: result is an exact prefix of the full result
    got = run(boxes, scores, labels, 0.5, 400, score_threshold=0.05, valid=valid, pre_nms_top_k=100, tile_size=32)
    np.testing.assert_array_equal(got, want[:len(got)])
    assert 0 < len(got) <= 100


def test_threshold_equality_zero_area_touching_ties():
    boxes = F32([
        [0, 0, 10, 10],   # 0: score .9
        [0, 0, 10, 5],    # 1: IoU with 0 exactly 0.5 -> NOT suppressed (strict >)
        [0, 0, 10, 6],    # 2: IoU 0.6 -> suppressed by 0
        [10, 0, 20, 10],  # 3: touches 0 -> IoU 0, kept
        [3, 3, 3, 3],     # 4: zero area inside 0 -> never suppressed
        [3, 3, 3, 3],     # 5: identical zero-area -> kept too
        [0, 0, 10, 10],   # 6: duplicate of 0 with the same score -> tie: 0 first, 6 suppressed
        [50, 50, 60, 60], # 7: score == score_thr -> not a candidate
    ])
    scores = F32([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.9, 0.05])
    labels = np.zeros(8, np.int32)
    got = run(boxes, scores, labels, 0.5, 8, score_threshold=0.05)
    np.testing.assert_array_equal(got, [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(got, ref_batched_nms(boxes, scores, labels, 0.5, 0.05))
    # swapping the tie order of the duplicates: the lower index still wins
    got = run(boxes[::-1].copy(), scores[::-1].copy(), labels, 0.5, 8, score_threshold=0.05)
    assert got[0] == 1  # old index 6, now 1, precedes old 0 (now 7)
    # class-aware: the duplicate in another class survives
    labels2 = labels.copy()
    labels2[6] = 3
    got = run(boxes, scores, labels2, 0.5, 8, score_threshold=0.05)
    np.testing.assert_array_equal(got, [0, 6, 1, 3, 4, 5])
    np.testing.assert_array_equal(got, ref_batched_nms(boxes, scores, labels2, 0.5, 0.05))
    # no candidate at all
    got = run(boxes, scores, labels, 0.5, 4, score_threshold=0.95)
    assert len(got) == 0


def test_suppression_chain_across_tiles():
    # sliding boxes: consecutive IoU 7/13 > 0.5, two apart 4/16 < 0.5 -> greedy keeps every other one;
    # the naive "suppressed by any higher box" rule would keep only the first.
    n = 40
    x = np.arange(n, dtype=F32) * 3
    boxes = np.stack([x, np.zeros(n, F32), x + 10, np.full(n, 10, F32)], -1)
    scores = np.linspace(1, 0.5, n).astype(F32)
    labels = np.zeros(n, np.int32)
    want = ref_batched_nms(boxes, scores, labels, 0.5)
    np.testing.assert_array_equal(want, np.arange(0, n, 2))
    for tile in (8, 64):
        np.testing.assert_array_equal(run(boxes, scores, labels, 0.5, n, tile_size=tile), want)


def test_vmap_batch():
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, 120, 3) for _ in range(3)]
    b = np.stack([s[0] for s in scenes])
    s = np.stack([s[1] for s in scenes])
    l = np.stack([s[2] for s in scenes])
    fn = jax.jit(jax.vmap(lambda bb, ss, ll: batched_nms(bb, ss, ll, 0.6, 30, score_threshold=0.3, tile_size=32)))
    idx, ok = map(np.asarray, fn(b, s, l))
    for i in range(3):
        want = ref_batched_nms(b[i], s[i], l[i], 0.6, 0.3)[:30]
        np.testing.assert_array_equal(idx[i][ok[i]], want)


def test_multiclass_nms():
    rng = np.random.default_rng(4)
    n, c = 150, 6
    boxes, _, _ = random_scene(rng, n, 1)
    scores = (rng.uniform(size=(n, c)) ** 3).astype(F32)
    scores[0, 2] = F32(0.05)  # exactly the threshold: excluded
    fn = jax.jit(lambda b, s: multiclass_nms(b, s, score_thr=0.05, iou_thr=0.5, max_num=100, return_inds=True))
    det, inds = fn(boxes, scores)
    ok = np.asarray(det.valid)
    fb = np.repeat(boxes, c, axis=0)
    fs = scores.reshape(-1)
    fl = np.tile(np.arange(c), n)
    want = ref_batched_nms(fb, fs, fl, 0.5, score_thr=0.05)[:100]
    assert ok.sum() == len(want) == 100
    np.testing.assert_array_equal(np.asarray(inds)[ok], want)
    np.testing.assert_array_equal(np.asarray(det.boxes)[ok], fb[want])
    np.testing.assert_array_equal(np.asarray(det.scores)[ok], fs[want])
    np.testing.assert_array_equal(np.asarray(det.labels)[ok], fl[want])
    # class-specific boxes (RCNN layout (N, C, 4)) and a candidate budget
    cboxes = (boxes[:, None, :] + rng.uniform(-2, 2, size=(n, c, 4))).astype(F32)
    det = multiclass_nms(cboxes, scores, score_thr=0.05, iou_thr=0.5, max_num=20, max_candidates=64)
    want = ref_batched_nms(cboxes.reshape(-1, 4), fs, fl, 0.5, score_thr=0.05)
    k = int(np.asarray(det.valid).sum())
    assert k == 20
    np.testing.assert_array_equal(np.asarray(det.boxes)[:k], cboxes.reshape(-1, 4)[want[:k]])


def test_topk_per_level():
    rng = np.random.default_rng(5)
    lv = [rng.uniform(size=n).astype(F32) for n in (50, 7, 3)]
    lv[0][[4, 9]] = 2.0  # tie: lower index first
    vals, idx = topk_per_level([jnp.asarray(x) for x in lv], 5)
    assert [v.shape[0] for v in vals] == [5, 5, 3]
    np.testing.assert_array_equal(np.asarray(idx[0])[:2], [4, 9])
    for x, v, i in zip(lv, vals, idx):
        np.testing.assert_array_equal(np.asarray(v), x[np.asarray(i)])
        np.testing.assert_array_equal(np.sort(np.asarray(v))[::-1], np.sort(x)[::-1][:len(v)])
