"""Training targets of Mask R-CNN for one image (mmdetection 2.11; ``shared/parity_spec.md`` §8-§10).

Pure functions with static shapes; :meth:`lit_jax.models.mask_rcnn.MaskRCNN.loss` ``vmap``s them over the batch.
Boxes are ``(x1, y1, x2, y2)`` in the padded, resized image's pixels. Ground truth is padded to ``G`` slots with
``gt_valid``.

* :func:`rpn_targets`: MaxIoU(0.7, 0.3, min_pos 0.3, low-quality matching) over the valid anchors, then
  RandomSampler(256, 0.5) - returned as the sampled anchors' indices, objectness targets and delta targets
  (stds 1).
* :func:`sample_rois`: mmdet's ``assign`` on the proposals + ``RandomSampler(512, 0.25, add_gt_as_proposals)``:
  the gts are prepended to the proposals as candidates (assigned to themselves), at most 128 positives are
  drawn at random, negatives fill up to 512. Slots ``[0, num_pos)`` of the result are the positives, so the
  mask branch takes the first ``int(num * pos_fraction)`` slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lit_jax.ops.assign import IGNORED, max_iou_assign, random_sample
from lit_jax.ops.boxes import encode_deltas

__all__ = ["RPNTargets", "rpn_targets", "RoISample", "sample_rois"]


class RPNTargets(NamedTuple):
    """The RPN's sampled anchors of one image (``S`` = sampler size, 256).

    ``indices`` ``(S,)`` int32 into the concatenated anchors; ``valid`` ``(S,)`` sampled slots; ``is_pos``
    ``(S,)`` positives (objectness target 1; the other valid slots are negatives, target 0); ``deltas`` ``(S, 4)``
    encoded gt of the positives (zeros elsewhere); ``num_pos`` / ``num_neg`` () int32.
    """
    indices: jnp.ndarray
    valid: jnp.ndarray
    is_pos: jnp.ndarray
    deltas: jnp.ndarray
    num_pos: jnp.ndarray
    num_neg: jnp.ndarray


def rpn_targets(key: jax.Array, anchors: jnp.ndarray, anchor_valid: jnp.ndarray, gt_boxes: jnp.ndarray,
                gt_valid: jnp.ndarray, *, pos_iou_thr: float = 0.7, neg_iou_thr: float = 0.3,
                min_pos_iou: float = 0.3, num: int = 256, pos_fraction: float = 0.5) -> RPNTargets:
    """mmdet ``RPNHead.get_targets`` (sampling) for one image.

    Args:
      key: PRNG key of the sampler.
      anchors: ``(N, 4)`` all levels' anchors; anchor_valid ``(N,)`` (inside the image's pad shape).
      gt_boxes: ``(G, 4)``; gt_valid ``(G,)`` bool.
    """
    res = max_iou_assign(anchors, gt_boxes, gt_valid, pos_iou_thr=pos_iou_thr, neg_iou_thr=neg_iou_thr,
                         min_pos_iou=min_pos_iou, anchor_valid=anchor_valid)
    s = random_sample(key, res.assigned_gt >= 0, res.assigned_gt == -1, num, pos_fraction)
    sampled_anchors = anchors[s.indices]
    gt_idx = jnp.maximum(res.assigned_gt[s.indices], 0)
    deltas = encode_deltas(sampled_anchors, gt_boxes[gt_idx])
    deltas = jnp.where(s.is_pos[:, None], deltas, 0.0)
    return RPNTargets(s.indices, s.valid, s.is_pos, deltas, s.num_pos, s.num_neg)


class RoISample(NamedTuple):
    """The RoI head's sampled RoIs of one image (``S`` = 512).

    ``rois`` ``(S, 4)`` boxes (invalid slots hold a copy of candidate 0); ``valid`` ``(S,)``; ``is_pos`` ``(S,)``
    (slots ``[0, num_pos)``); ``labels`` ``(S,)`` int32: the gt label of positives, ``num_classes`` (background)
    otherwise; ``deltas`` ``(S, 4)`` encoded gt (stds ``target_stds``) of positives, zeros elsewhere;
    ``gt_index`` ``(S,)`` int32 assigned gt slot (0 for non-positives); ``num_pos`` () int32.
    """
    rois: jnp.ndarray
    valid: jnp.ndarray
    is_pos: jnp.ndarray
    labels: jnp.ndarray
    deltas: jnp.ndarray
    gt_index: jnp.ndarray
    num_pos: jnp.ndarray


def sample_rois(key: jax.Array, proposals: jnp.ndarray, proposal_valid: jnp.ndarray, gt_boxes: jnp.ndarray,
                gt_labels: jnp.ndarray, gt_valid: jnp.ndarray, *, num_classes: int, pos_iou_thr: float = 0.5,
                neg_iou_thr: float = 0.5, min_pos_iou: float = 0.5, num: int = 512, pos_fraction: float = 0.25,
                target_stds=(0.1, 0.1, 0.2, 0.2)) -> RoISample:
    """mmdet ``StandardRoIHead`` assign + sample + ``BBoxHead.get_targets`` for one image.

    The assigner sees the proposals only (``max_iou_assign`` with ``anchor_valid=proposal_valid``); the gts,
    prepended as candidates, are positives of themselves (mmdet ``assign_result.add_gt_``).

    Args:
      key: PRNG key of the sampler.
      proposals: ``(P, 4)`` (detached) proposals; proposal_valid ``(P,)``.
      gt_boxes: ``(G, 4)``; gt_labels ``(G,)`` int; gt_valid ``(G,)``.
    """
    g = gt_boxes.shape[0]
    proposals = jax.lax.stop_gradient(proposals)
    res = max_iou_assign(proposals, gt_boxes, gt_valid, pos_iou_thr=pos_iou_thr, neg_iou_thr=neg_iou_thr,
                         min_pos_iou=min_pos_iou, anchor_valid=proposal_valid)
    gt_self = jnp.where(gt_valid, jnp.arange(g, dtype=jnp.int32), IGNORED)
    candidates = jnp.concatenate([gt_boxes.astype(jnp.float32), proposals.astype(jnp.float32)])
    assigned = jnp.concatenate([gt_self, res.assigned_gt])
    s = random_sample(key, assigned >= 0, assigned == -1, num, pos_fraction)
    rois = candidates[s.indices]
    gt_idx = jnp.where(s.is_pos, jnp.maximum(assigned[s.indices], 0), 0)
    labels = jnp.where(s.is_pos, gt_labels[gt_idx].astype(jnp.int32), num_classes)
    deltas = encode_deltas(rois, gt_boxes[gt_idx], stds=target_stds)
    deltas = jnp.where(s.is_pos[:, None], deltas, 0.0)
    return RoISample(rois, s.valid, s.is_pos, labels, deltas, gt_idx.astype(jnp.int32), s.num_pos)
