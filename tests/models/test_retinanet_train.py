"""RetinaNet training behaviour: losses against a numpy reference of mmdet's targets, and overfitting."""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from lit_jax.models import build_detector

SMALL = {
    "type": "retinanet",
    "backbone": "lit_ti",
    "backbone_args": {"embed_dims": (16, 32, 40, 48), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 2)},
    "num_classes": 3,
    "fpn_channels": 32,
    "head": {"feat_channels": 32, "stacked_convs": 2},
}


def _batch(canvas=(256, 384)):
    boxes = np.zeros((2, 4, 4), np.float32)
    labels = np.zeros((2, 4), np.int32)
    valid = np.zeros((2, 4), bool)
    boxes[0, :3] = [[20, 30, 120, 150], [200, 40, 330, 100], [60, 160, 110, 230]]
    labels[0, :3] = [0, 1, 2]
    valid[0, :3] = True
    boxes[1, :2] = [[10, 10, 90, 60], [150, 120, 370, 250]]
    labels[1, :2] = [2, 0]
    valid[1, :2] = True
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, canvas[0], canvas[1], 3)).astype(np.float32) * 0.2
    for b in range(2):  # paint the objects so the batch is learnable
        for (x1, y1, x2, y2), lab, ok in zip(boxes[b], labels[b], valid[b]):
            if ok:
                images[b, int(y1):int(y2), int(x1):int(x2), lab] += 2.0
    return {
        "images": jnp.asarray(images),
        "gt_boxes": jnp.asarray(boxes),
        "gt_labels": jnp.asarray(labels),
        "gt_valid": jnp.asarray(valid),
        "pad_shape": jnp.asarray([[256, 384], [224, 384]], jnp.int32),
    }


@pytest.mark.slow  # ~45-60 s on 2 cores; the training entry point's tests cover optimisation in the default suite
def test_fifty_adamw_steps_drive_the_loss_down_five_fold():
    det = build_detector(SMALL)
    batch = _batch()
    variables = det.init(jax.random.PRNGKey(0), batch["images"].shape[1:3])
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, key):
        def f(p):
            loss, aux = det.loss({"params": p, "batch_stats": stats}, batch, key)
            return loss, aux
        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), aux["batch_stats"], opt, loss

    losses = []
    key = jax.random.PRNGKey(1)
    for i in range(50):
        key, sub = jax.random.split(key)
        params, stats, opt, loss = step(params, stats, opt, sub)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] * 5 <= losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def _numpy_targets(anchors, valid, gt, labels, gt_valid, num_classes, pos_thr=0.5, neg_thr=0.4):
    """mmdet MaxIoUAssigner + RetinaNet targets, written plainly with loops (reference)."""
    gts = [(g, l) for g, l, ok in zip(gt, labels, gt_valid) if ok]
    n = len(anchors)
    assigned = np.full(n, -2)
    if not gts:
        assigned[valid] = -1
    else:
        g = np.array([x for x, _ in gts], np.float64)
        a = anchors.astype(np.float64)
        ix1 = np.maximum(g[:, None, 0], a[None, :, 0]); iy1 = np.maximum(g[:, None, 1], a[None, :, 1])
        ix2 = np.minimum(g[:, None, 2], a[None, :, 2]); iy2 = np.minimum(g[:, None, 3], a[None, :, 3])
        inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
        area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]); area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        iou = inter / np.maximum(area_g[:, None] + area_a[None] - inter, 1e-6)
        iou[:, ~valid] = -1
        max_iou, arg = iou.max(0), iou.argmax(0)
        assigned[valid & (max_iou >= 0) & (max_iou < neg_thr)] = -1
        assigned[valid & (max_iou >= pos_thr)] = arg[valid & (max_iou >= pos_thr)]
        gt_max = iou.max(1)
        for i in range(len(gts)):
            if gt_max[i] >= 0:
                assigned[valid & (iou[i] == gt_max[i])] = i
    pos = assigned >= 0
    lab = np.full(n, num_classes)
    lab[pos] = [gts[i][1] for i in assigned[pos]]
    return pos, assigned == -1, lab, np.array([x for x, _ in gts], np.float64).reshape(-1, 4), assigned


def test_targets_and_normaliser_match_a_plain_reference():
    det = build_detector(SMALL)
    batch = _batch()
    canvas = batch["images"].shape[1:3]
    anchors = np.concatenate(det.anchors(canvas))
    from lit_jax.ops.anchors import feature_sizes, multilevel_valid_flags

    feat = feature_sizes(canvas, det.anchor_cfg.strides)
    for b in range(2):
        valid = np.concatenate([np.asarray(v) for v in multilevel_valid_flags(
            feat, np.asarray(batch["pad_shape"][b]), det.anchor_cfg.strides, 9)])
        onehot, weight, _, pos = det.image_targets(
            jnp.asarray(anchors), jnp.asarray(valid), batch["gt_boxes"][b], batch["gt_labels"][b], batch["gt_valid"][b])
        want_pos, want_neg, want_lab, _, _ = _numpy_targets(
            anchors, valid, np.asarray(batch["gt_boxes"][b]), np.asarray(batch["gt_labels"][b]),
            np.asarray(batch["gt_valid"][b]), 3)
        np.testing.assert_array_equal(np.asarray(pos), want_pos)
        np.testing.assert_array_equal(np.asarray(weight) > 0, want_pos | want_neg)
        np.testing.assert_array_equal(np.asarray(onehot).argmax(1)[want_pos], want_lab[want_pos])
        assert want_pos.sum() > 0
        if b == 1:  # pad_shape 224 < canvas 256: the bottom anchors are invalid
            assert not valid.all()


@pytest.mark.parametrize("group", [None, 1])
def test_loss_normalisation_per_group(group):
    """loss_group_size=1: each image normalised by its own positives, then averaged (DDP over 1-image GPUs)."""
    cfg = dict(SMALL, train_test={"loss_group_size": group})
    det = build_detector(cfg)
    batch = _batch()
    variables = det.init(jax.random.PRNGKey(0), batch["images"].shape[1:3])
    total, aux = det.loss(variables, batch, train=False)
    singles = []
    for b in range(2):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        t, a = det.loss(variables, one, train=False)
        singles.append((float(a["loss_cls"]), float(a["loss_bbox"]), int(a["num_pos"])))
    if group == 1:
        want = np.mean([c + r for c, r, _ in singles])
    else:
        npos = sum(max(p, 1) for _, _, p in singles)
        want = sum((c + r) * max(p, 1) for c, r, p in singles) / npos
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def _numpy_retina_losses(logits, deltas, anchors, valid, batch, num_classes, group):
    """mmdet 2.11 RetinaHead.loss in float64: sigmoid focal loss (alpha .25, gamma 2) on positives and
    negatives, L1 on the positives' DeltaXYWH targets (means 0, stds 1), each divided by the per-group
    sum of max(num_pos, 1), then averaged over the groups."""
    alpha, gamma, tiny = 0.25, 2.0, np.finfo(np.float32).tiny
    cls, reg, npos = [], [], []
    for b in range(len(logits)):
        pos, neg, lab, gts, assigned = _numpy_targets(
            anchors, valid[b], np.asarray(batch["gt_boxes"][b]), np.asarray(batch["gt_labels"][b]),
            np.asarray(batch["gt_valid"][b]), num_classes)
        p = 1.0 / (1.0 + np.exp(-logits[b].astype(np.float64)))
        target = np.zeros_like(p)
        target[pos, lab[pos]] = 1.0
        fl = np.where(target == 1, -alpha * (1 - p) ** gamma * np.log(np.maximum(p, tiny)),
                      -(1 - alpha) * p ** gamma * np.log(np.maximum(1 - p, tiny)))
        cls.append((fl * (pos | neg)[:, None]).sum())
        a = anchors[pos].astype(np.float64)
        g = gts[assigned[pos]] if pos.any() else np.zeros((0, 4))
        pw, ph = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
        t = np.stack([((g[:, 0] + g[:, 2]) - (a[:, 0] + a[:, 2])) * 0.5 / pw,
                      ((g[:, 1] + g[:, 3]) - (a[:, 1] + a[:, 3])) * 0.5 / ph, np.log(gw / pw), np.log(gh / ph)], 1)
        reg.append(np.abs(deltas[b][pos].astype(np.float64) - t).sum())
        npos.append(int(pos.sum()))
    group = group or len(logits)
    out = {"loss_cls": [], "loss_bbox": []}
    for s in range(0, len(logits), group):
        norm = sum(max(n, 1) for n in npos[s:s + group])
        out["loss_cls"].append(sum(cls[s:s + group]) / norm)
        out["loss_bbox"].append(sum(reg[s:s + group]) / norm)
    return {k: float(np.mean(v)) for k, v in out.items()}, npos


def test_loss_values_match_a_numpy_focal_l1_reference():
    """loss_cls / loss_bbox of RetinaNet.loss against mmdet's formulas, on 4 images with 3, 1, 0 and 2 gts
    in loss groups of 2 (the original's 2 images per GPU; the image without gt shares a group)."""
    group = 2
    from lit_jax.ops.anchors import feature_sizes, multilevel_valid_flags

    det = build_detector(dict(SMALL, train_test={"loss_group_size": group}))
    canvas = (128, 192)
    rng = np.random.default_rng(3)
    boxes = np.zeros((4, 3, 4), np.float32)
    boxes[0] = [[10, 12, 70, 90], [100, 20, 180, 60], [30, 70, 60, 120]]
    boxes[1, 0] = [40, 30, 150, 110]
    boxes[3, :2] = [[5, 5, 40, 30], [120, 40, 190, 125]]
    valid = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
    batch = {
        "images": jnp.asarray(rng.standard_normal((4, *canvas, 3)).astype(np.float32)),
        "gt_boxes": jnp.asarray(boxes),
        "gt_labels": jnp.asarray([[0, 1, 2], [2, 0, 0], [0, 0, 0], [1, 0, 0]], jnp.int32),
        "gt_valid": jnp.asarray(valid),
        "pad_shape": jnp.asarray([[128, 192], [96, 192], [128, 160], [128, 192]], jnp.int32),
    }
    variables = jax.jit(lambda k: det.init(k, canvas))(jax.random.PRNGKey(0))  # (eager init is slow)

    @jax.jit
    def loss_and_outputs(v, bt):
        _, aux = det.loss(v, bt, train=False)
        (cls_out, reg_out), _ = det.forward(v, bt["images"], train=False)
        return aux, jnp.concatenate(cls_out, axis=1), jnp.concatenate(reg_out, axis=1)

    aux, logits, deltas = jax.device_get(loss_and_outputs(variables, batch))
    anchors = np.concatenate(det.anchors(canvas))
    feat = feature_sizes(canvas, det.anchor_cfg.strides)
    anchor_valid = [np.concatenate([np.asarray(v) for v in multilevel_valid_flags(
        feat, np.asarray(batch["pad_shape"][b]), det.anchor_cfg.strides, 9)]) for b in range(4)]
    want, npos = _numpy_retina_losses(logits, deltas, anchors, anchor_valid, batch, 3, group)
    assert npos[2] == 0 and all(n > 0 for i, n in enumerate(npos) if i != 2) and len(set(npos)) > 1
    assert int(aux["num_pos"]) == sum(npos)
    for k in ("loss_cls", "loss_bbox"):
        np.testing.assert_allclose(float(aux[k]), want[k], rtol=2e-5, err_msg=k)
