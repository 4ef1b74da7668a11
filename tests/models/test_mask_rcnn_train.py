"""Mask R-CNN training: the five loss terms against a numpy reference of mmdet 2.11's targets, sampler edge cases,
and overfitting one batch.

The reference (:func:`_reference_losses`) re-implements mmdet's ``MaxIoUAssigner.assign_wrt_overlaps`` loop, the
coder and the loss normalisers in numpy. To make the comparison exact, the samplers' quotas are set so that every
candidate is drawn (256 RPN samples > anchors in the tiny canvas; the RoI quota covers every gt + proposal with
``pos_fraction = 1``): then the sample is deterministic and equals mmdet's for any random stream. Proposals come
from :meth:`MaskRCNN.proposals` (parity-tested against the torch reference in test_mask_rcnn_parity.py), the head
outputs for the reference's RoIs from :meth:`MaskRCNN.bbox_forward` / :meth:`MaskRCNN.mask_forward` (also
parity-tested), and the mask targets from :func:`mask_targets_from_crops` (tested in test_mask_targets.py).
Tolerance: each term within 1e-5 relative.
"""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from lit_jax.models import build_detector
from lit_jax.models.mask_rcnn_targets import sample_rois
from lit_jax.ops.mask_targets import mask_targets_from_crops

NUM_CLASSES = 3
CANVAS = (64, 96)
G = 4


def _small(**train_test):
    return {
        "type": "mask_rcnn",
        "backbone": "lit_ti",
        "backbone_args": {"embed_dims": (16, 32, 40, 48), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 2),
                          "drop_path_rate": 0.0},
        "num_classes": NUM_CLASSES,
        "fpn_channels": 32,
        "head": {"fc_out_channels": 64, "mask_conv_channels": 16},
        "train_test": dict({"loss_group_size": 2}, **train_test),
    }


EXACT = dict(rpn_num_samples=4096, rpn_pos_fraction=0.5, rpn_train_nms_pre=300, rpn_train_max_per_img=60,
             rcnn_num_samples=G + 60, rcnn_pos_fraction=1.0)


def _batch(canvas=CANVAS, seed=0):
    rng = np.random.default_rng(seed)
    boxes = np.zeros((2, G, 4), np.float32)
    labels = np.zeros((2, G), np.int32)
    valid = np.zeros((2, G), bool)
    boxes[0, :3] = [[6, 8, 40, 50], [50, 10, 90, 30], [20, 30, 36, 60]]
    labels[0, :3] = [0, 1, 2]
    valid[0, :3] = True
    boxes[1, :2] = [[4, 4, 30, 26], [30, 20, 62, 60]]
    labels[1, :2] = [2, 0]
    valid[1, :2] = True
    images = rng.standard_normal((2, canvas[0], canvas[1], 3)).astype(np.float32) * 0.2
    masks = np.zeros((2, G, 56, 56), np.uint8)
    yy, xx = np.mgrid[0:56, 0:56]
    for b in range(2):
        for g in range(G):
            if valid[b, g]:
                x1, y1, x2, y2 = boxes[b, g]
                images[b, int(y1):int(y2), int(x1):int(x2), labels[b, g]] += 2.0
                masks[b, g] = ((xx - 27.5) ** 2 / 28 ** 2 + (yy - 27.5) ** 2 / 28 ** 2 <= 1.0)  # an ellipse
    return {
        "images": jnp.asarray(images),
        "gt_boxes": jnp.asarray(boxes),
        "gt_labels": jnp.asarray(labels),
        "gt_valid": jnp.asarray(valid),
        "gt_masks": jnp.asarray(masks),
        "img_shape": jnp.asarray([[64, 96], [60, 64]], jnp.int32),
        "pad_shape": jnp.asarray([[64, 96], [64, 64]], jnp.int32),
    }


# --------------------------------------------------------------------------------------------------------------
# numpy reference
# --------------------------------------------------------------------------------------------------------------
def _np_iou(a, b):
    """mmdet bbox_overlaps(a, b), (N, M)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = np.maximum(area_a[:, None] + area_b[None] - inter, np.finfo(np.float32).eps)
    return inter / union


def _np_assign(boxes, gts, pos_thr, neg_thr, min_pos):
    """mmdet MaxIoUAssigner.assign_wrt_overlaps (match_low_quality, gt_max_assign_all): gt_inds (0 bg, -1 ign)."""
    n = len(boxes)
    if len(gts) == 0:
        return np.zeros(n, np.int64)
    ov = _np_iou(gts, boxes)  # (G, N)
    max_ov, argmax = ov.max(0), ov.argmax(0)
    gt_max = ov.max(1)
    inds = np.full(n, -1, np.int64)
    inds[(max_ov >= 0) & (max_ov < neg_thr)] = 0
    inds[max_ov >= pos_thr] = argmax[max_ov >= pos_thr] + 1
    for i in range(len(gts)):
        if gt_max[i] >= min_pos:
            inds[ov[i] == gt_max[i]] = i + 1
    return inds


def _np_encode(p, g, stds=(1.0, 1.0, 1.0, 1.0)):
    p, g = p.astype(np.float64), g.astype(np.float64)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    d = np.stack([((g[:, 0] + g[:, 2]) - (p[:, 0] + p[:, 2])) * 0.5 / pw,
                  ((g[:, 1] + g[:, 3]) - (p[:, 1] + p[:, 3])) * 0.5 / ph,
                  np.log(gw / pw), np.log(gh / ph)], 1)
    return d / np.asarray(stds)


def _bce(x, y):
    x = x.astype(np.float64)
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def _reference_losses(det, variables, batch):
    cfg = det.cfg
    images = batch["images"]
    feats, (rpn_logits, rpn_deltas) = det.train_forward(variables, images, None)[0]
    b = images.shape[0]
    levels = det.anchors(images.shape[1:3])
    anchors = np.concatenate(levels)
    logits = np.concatenate([np.asarray(x) for x in rpn_logits], 1)
    deltas = np.concatenate([np.asarray(x) for x in rpn_deltas], 1)
    gtb, gtl, gtv = (np.asarray(batch[k]) for k in ("gt_boxes", "gt_labels", "gt_valid"))
    pad = np.asarray(batch["pad_shape"])

    # RPN
    cls_sum = reg_sum = 0.0
    n_pos = n_neg = 0
    for i in range(b):
        flags = []
        for (fh, fw), stride in zip([(lv_h, lv_w) for lv_h, lv_w in _level_hw(images.shape[1:3])],
                                    det.anchor_cfg.strides):
            vy = np.arange(fh) < min(-(-pad[i, 0] // stride), fh)
            vx = np.arange(fw) < min(-(-pad[i, 1] // stride), fw)
            flags.append(np.repeat((vy[:, None] & vx[None]).reshape(-1), 3))
        inside = np.concatenate(flags)
        gts = gtb[i][gtv[i]]
        inds = _np_assign(anchors[inside], gts, 0.7, 0.3, 0.3)
        lg, dl, an = logits[i][inside], deltas[i][inside], anchors[inside]
        pos, neg = inds > 0, inds == 0
        cls_sum += _bce(lg[pos], 1.0).sum() + _bce(lg[neg], 0.0).sum()
        if pos.any():
            reg_sum += np.abs(dl[pos] - _np_encode(an[pos], gts[inds[pos] - 1])).sum()
        n_pos += max(pos.sum(), 1)
        n_neg += max(neg.sum(), 1)
    rpn_norm = n_pos + n_neg

    # RoI head: every gt + proposal drawn.
    props, _, pvalid = det.proposals((rpn_logits, rpn_deltas), images.shape[1:3],
                                     batch["img_shape"].astype(jnp.float32), nms_pre=cfg.rpn_train_nms_pre,
                                     max_per_img=cfg.rpn_train_max_per_img)
    props, pvalid = np.asarray(props), np.asarray(pvalid)
    ce_sum = l1_sum = mask_sum = 0.0
    n_rois = n_mask = 0
    for i in range(b):
        gts, labs = gtb[i][gtv[i]], gtl[i][gtv[i]]
        p = props[i][pvalid[i]]
        inds = np.concatenate([np.arange(1, len(gts) + 1), _np_assign(p, gts, 0.5, 0.5, 0.5)])
        cand = np.concatenate([gts, p])
        keep = inds >= 0
        cand, inds = cand[keep], inds[keep]
        rois = np.concatenate([np.full((len(cand), 1), 0.0), cand], 1).astype(np.float32)
        one = jax.tree_util.tree_map(lambda f: f[i:i + 1], feats)
        cls, reg = (np.asarray(x) for x in det.bbox_forward(variables, one, jnp.asarray(rois), train=True))
        labels = np.where(inds > 0, labs[np.maximum(inds - 1, 0)], NUM_CLASSES)
        logp = cls.astype(np.float64) - np.log(np.exp(cls.astype(np.float64)).sum(1, keepdims=True))
        ce_sum += -logp[np.arange(len(cand)), labels].sum()
        pos = inds > 0
        if pos.any():
            t = _np_encode(cand[pos], gts[inds[pos] - 1], (0.1, 0.1, 0.2, 0.2))
            pred = reg[pos].reshape(-1, NUM_CLASSES, 4)[np.arange(pos.sum()), labels[pos]]
            l1_sum += np.abs(pred - t).sum()
            # masks: targets from the crops of the assigned gts
            crops = np.asarray(batch["gt_masks"][i])
            tgt = np.asarray(mask_targets_from_crops(jnp.asarray(crops), jnp.asarray(gtb[i]),
                                                     jnp.asarray(cand[pos]),
                                                     jnp.asarray(np.flatnonzero(gtv[i])[inds[pos] - 1], np.int32),
                                                     jnp.asarray(pad[i])))
            ml = np.asarray(det.mask_forward(variables, one, jnp.asarray(rois[pos]), train=True))
            ml = ml[np.arange(pos.sum()), :, :, labels[pos]]
            mask_sum += _bce(ml, tgt).sum()
            n_mask += pos.sum() * 28 * 28
        n_rois += len(cand)
    return {"loss_rpn_cls": cls_sum / rpn_norm, "loss_rpn_bbox": reg_sum / rpn_norm, "loss_cls": ce_sum / n_rois,
            "loss_bbox": l1_sum / n_rois, "loss_mask": mask_sum / max(n_mask, 1)}


def _level_hw(canvas):
    from lit_jax.ops.anchors import feature_sizes

    return feature_sizes(canvas, (4, 8, 16, 32, 64))


@pytest.fixture(scope="module")
def exact_setup():
    det = build_detector(_small(**EXACT))
    batch = _batch()
    variables = det.init(jax.random.PRNGKey(1), CANVAS)
    return det, variables, batch


def test_losses_match_numpy_reference(exact_setup):
    det, variables, batch = exact_setup
    total, aux = jax.jit(lambda v, bt: det.loss(v, bt, jax.random.PRNGKey(3)))(variables, batch)
    ref = _reference_losses(det, variables, batch)
    for k, want in ref.items():
        got = float(aux[k])
        assert abs(got - want) <= 1e-5 * max(abs(want), 1e-6), f"{k}: {got} vs reference {want}"
    assert ref["loss_mask"] > 0 and ref["loss_bbox"] > 0 and ref["loss_rpn_bbox"] > 0  # every term exercised
    np.testing.assert_allclose(float(total), sum(ref.values()), rtol=1e-5)


def test_sample_rois_edge_cases():
    """Fewer positives than the quota; an image without gt; the gts always join as positives."""
    props = jnp.asarray([[0, 0, 10, 10], [1, 1, 11, 11], [40, 40, 50, 50], [0, 0, 0, 0]], jnp.float32)
    pvalid = jnp.asarray([True, True, True, False])
    gts = jnp.asarray([[0, 0, 10, 10], [0, 0, 0, 0]], jnp.float32)
    labels = jnp.asarray([2, 0], jnp.int32)
    s = sample_rois(jax.random.PRNGKey(0), props, pvalid, gts, labels, jnp.asarray([True, False]), num_classes=3,
                    num=8, pos_fraction=0.5)
    # candidates: gt0 (pos), p0 (IoU 1, pos), p1 (IoU 0.68, pos), p2 (neg); invalid slots excluded
    assert int(s.num_pos) == 3 and int(np.sum(s.valid)) == 4
    np.testing.assert_array_equal(np.asarray(s.labels)[:4], [2, 2, 2, 3])
    np.testing.assert_allclose(np.asarray(s.rois)[0], [0, 0, 10, 10])
    assert not np.asarray(s.valid)[4:].any()
    np.testing.assert_allclose(np.asarray(s.deltas)[3:], 0.0)
    # quota below the positives: exactly int(num * pos_fraction) positives, negatives fill the rest
    s = sample_rois(jax.random.PRNGKey(1), props, pvalid, gts, labels, jnp.asarray([True, False]), num_classes=3,
                    num=2, pos_fraction=0.5)
    assert int(s.num_pos) == 1 and np.asarray(s.valid).sum() == 2 and np.asarray(s.labels)[1] == 3
    # no gt at all: every valid proposal is a negative
    s = sample_rois(jax.random.PRNGKey(2), props, pvalid, gts, labels, jnp.asarray([False, False]), num_classes=3,
                    num=8, pos_fraction=0.25)
    assert int(s.num_pos) == 0 and np.asarray(s.valid).sum() == 3
    assert (np.asarray(s.labels) == 3).all()


@pytest.fixture(scope="module")
def train_setup():
    """One compiled AdamW step shared by the tests below (the batch is an argument: no recompiles)."""
    det = build_detector(_small(rpn_train_nms_pre=300, rpn_train_max_per_img=100, rcnn_num_samples=64))
    variables = det.init(jax.random.PRNGKey(0), CANVAS)
    tx = optax.adamw(1e-3, weight_decay=1e-4)

    @jax.jit
    def step(params, stats, opt, batch, key):
        def f(p):
            return det.loss({"params": p, "batch_stats": stats}, batch, key)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), aux["batch_stats"], opt, aux, grads

    return variables, tx, step


def test_images_without_gt_give_finite_losses_and_grads(train_setup):
    variables, tx, step = train_setup
    params, stats = variables["params"], variables["batch_stats"]
    batch = _batch()
    batch["gt_valid"] = jnp.zeros_like(batch["gt_valid"]).at[0, 0].set(True)  # image 1 has no gt
    _, _, _, aux, grads = step(params, stats, tx.init(params), batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(sum(aux[k] for k in aux if k.startswith("loss_"))))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    # with no gt anywhere, the box and mask terms are exactly 0 and the gradients finite
    batch["gt_valid"] = jnp.zeros_like(batch["gt_valid"])
    _, _, _, aux, grads = step(params, stats, tx.init(params), batch, jax.random.PRNGKey(0))
    assert float(aux["loss_bbox"]) == 0.0 and float(aux["loss_mask"]) == 0.0 and float(aux["loss_rpn_bbox"]) == 0.0
    assert float(aux["loss_cls"]) > 0.0 and float(aux["loss_rpn_cls"]) > 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_overfitting_one_batch_drives_every_term_down(train_setup):
    """120 AdamW steps (lr 1e-3) on one batch: every term's mean over the last 5 steps is below 0.6 x its mean
    over steps 1-5 (step 0 is left out: the untrained RPN gives the RoI head few positives there)."""
    variables, tx, step = train_setup
    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)
    batch = _batch()
    history = []
    for i in range(120):
        params, stats, opt, aux, _ = step(params, stats, opt, batch, jax.random.PRNGKey(i))
        history.append({k: float(v) for k, v in aux.items() if k.startswith("loss_")})
    first = {k: np.mean([h[k] for h in history[1:6]]) for k in history[0]}
    last = {k: np.mean([h[k] for h in history[-5:]]) for k in history[0]}
    for k in first:
        assert last[k] < 0.6 * first[k], f"{k}: {first[k]:.4f} -> {last[k]:.4f}"
