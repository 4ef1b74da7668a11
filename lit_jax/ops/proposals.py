"""RPN proposals with mmdetection 2.11 semantics (``RPNHead._get_bboxes``; parity_spec.md §8, §14.11).

For one image (static shapes; ``jax.vmap`` it over the batch):

1. per level: ``scores = sigmoid(logits)``; keep the top ``k_l = min(nms_pre, N_l)`` by score (mmdet sorts and
   slices when ``N_l > nms_pre``, keeps the level whole otherwise: the same set);
2. decode the kept deltas on their anchors with the DeltaXYWH coder (means 0, stds 1, dw/dh clamp
   ``|log(16/1000)|``) and clip to ``img_shape``;
3. concatenate the levels (low to high) and run mmcv ``batched_nms`` with the **level id as the class**
   (offset trick in float32, so NMS is per level), IoU ``iou_thr`` (suppress iff ``inter > thr * union``);
4. keep the first ``max_per_img`` survivors by descending score, across levels.

There is no min-size filter: mmdet 2.11 only filters when ``min_bbox_size > 0`` and the LIT configs use 0, so
zero-area proposals (anchors clipped to a border line) stay; the NMS kernel never suppresses with them.

Ties: ``lax.top_k`` and our NMS order equal scores by lower index (within a level, by anchor index; across
levels, by level). torch's CUDA sort gives no order for ties, so with exactly equal scores the reference can
pick another (equally valid) member at the ``nms_pre`` / ``max_per_img`` cut or at an NMS decision.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

from lit_jax.ops.boxes import decode_deltas
from lit_jax.ops.nms import DEFAULT_TILE_SIZE, batched_nms

__all__ = ["rpn_proposals", "rpn_level_topk"]


def rpn_level_topk(level_logits: Sequence[jnp.ndarray], level_deltas: Sequence[jnp.ndarray],
                   level_anchors: Sequence[jnp.ndarray], nms_pre: int):
    """Step 1: per level, the ``min(nms_pre, N_l)`` best anchors by sigmoid score (``nms_pre <= 0``: all).

    Returns concatenated (scores ``(K,)``, deltas ``(K, 4)``, anchors ``(K, 4)``, level ids ``(K,)`` int32)
    with ``K = sum_l k_l``, each level's entries in descending score order.
    """
    if not (len(level_logits) == len(level_deltas) == len(level_anchors)):
        raise ValueError("level_logits, level_deltas and level_anchors must have one entry per level")
    scores_all, deltas_all, anchors_all, ids_all = [], [], [], []
    for lvl, (logits, deltas, anchors) in enumerate(zip(level_logits, level_deltas, level_anchors)):
        logits = jnp.asarray(logits, jnp.float32).reshape(-1)
        deltas = jnp.asarray(deltas, jnp.float32).reshape(-1, 4)
        anchors = jnp.asarray(anchors, jnp.float32).reshape(-1, 4)
        n = logits.shape[0]
        if deltas.shape[0] != n or anchors.shape[0] != n:
            raise ValueError(f"level {lvl}: {n} logits, {deltas.shape[0]} deltas, {anchors.shape[0]} anchors")
        scores = jax.nn.sigmoid(logits)
        k = n if nms_pre <= 0 else min(int(nms_pre), n)
        if k < n:
            scores, idx = jax.lax.top_k(scores, k)
            deltas, anchors = deltas[idx], anchors[idx]
        scores_all.append(scores)
        deltas_all.append(deltas)
        anchors_all.append(anchors)
        ids_all.append(jnp.full((k,), lvl, jnp.int32))
    cat = jnp.concatenate
    return cat(scores_all), cat(deltas_all), cat(anchors_all), cat(ids_all)


def rpn_proposals(level_logits: Sequence[jnp.ndarray], level_deltas: Sequence[jnp.ndarray],
                  level_anchors: Sequence[jnp.ndarray], img_shape, *, nms_pre: int = 1000,
                  max_per_img: int = 1000, iou_thr: float = 0.7,
                  tile_size: int = DEFAULT_TILE_SIZE) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """mmdet 2.11 ``RPNHead._get_bboxes`` for one image.

    Args:
      level_logits: per level ``(N_l,)`` objectness logits (anchor order ``(y*W + x)*A + a``).
      level_deltas: per level ``(N_l, 4)`` deltas.
      level_anchors: per level ``(N_l, 4)`` anchors (numpy constants are fine).
      img_shape: ``(2,)`` (h, w) of the resized image (static or traced); proposals are clipped to it.
      nms_pre: per-level candidates (test 1000, train 2000); ``<= 0`` keeps every anchor.
      max_per_img: static number of output slots (1000).
      iou_thr: NMS IoU threshold (0.7), strict ``>``.
      tile_size: tile of the blocked greedy NMS (performance only).

    Returns:
      ``(boxes (max_per_img, 4), scores (max_per_img,), valid (max_per_img,) bool)`` sorted by descending
      score; slots past the number of survivors are invalid and hold zeros.
    """
    scores, deltas, anchors, level_ids = rpn_level_topk(level_logits, level_deltas, level_anchors, nms_pre)
    img_hw = jnp.asarray(img_shape, jnp.float32).reshape(-1)[:2]
    boxes = decode_deltas(anchors, deltas, max_shape=img_hw)
    # Every candidate enters NMS (pre_nms_top_k = K), so the result is exact for any K.
    keep, valid = batched_nms(boxes, scores, level_ids, iou_thr, max_per_img, pre_nms_top_k=scores.shape[0],
                              tile_size=tile_size)
    out_boxes = jnp.where(valid[:, None], boxes[keep], 0.0)
    out_scores = jnp.where(valid, scores[keep], 0.0)
    return out_boxes, out_scores, valid
