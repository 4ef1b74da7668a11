"""mmdet 2.x ``MaxIoUAssigner`` and ``RandomSampler`` with static shapes (parity_spec.md §6, §8, §9).

Assignment codes (ours differ from mmdet's ``gt_inds`` by one):

============  ===========================  =======================
ours          meaning                      mmdet ``gt_inds``
============  ===========================  =======================
``i >= 0``    positive, matched to gt i    ``i + 1``
``-1``        negative (background)        ``0``
``-2``        ignored / invalid anchor     ``-1`` (or filtered out)
============  ===========================  =======================
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from lit_jax.ops.boxes import box_iou

__all__ = ["AssignResult", "max_iou_assign", "SampleResult", "random_sample", "POSITIVE_MIN",
           "NEGATIVE", "IGNORED"]

NEGATIVE = -1
IGNORED = -2
POSITIVE_MIN = 0


class AssignResult(NamedTuple):
    """``assigned_gt`` (N,) int32: gt index, ``-1`` negative, ``-2`` ignored.
    ``max_iou`` (N,) float32: each anchor's max IoU over the valid gts (0 when there are none)."""
    assigned_gt: jnp.ndarray
    max_iou: jnp.ndarray


def max_iou_assign(anchors: jnp.ndarray, gt_boxes: jnp.ndarray, gt_valid: jnp.ndarray, *,
                   pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float,
                   match_low_quality: bool = True, gt_max_assign_all: bool = True,
                   anchor_valid: Optional[jnp.ndarray] = None) -> AssignResult:
    """mmdet ``MaxIoUAssigner.assign`` for one image, vectorised.

    Args:
      anchors: ``(N, 4)`` anchors (or proposals).
      gt_boxes: ``(G, 4)`` ground truth, padded to a static ``G``.
      gt_valid: ``(G,)`` bool; padded rows never match anything.
      pos_iou_thr, neg_iou_thr, min_pos_iou: mmdet's thresholds (float ``neg_iou_thr`` only).
      match_low_quality: mmdet's low-quality matching (step 4 below).
      gt_max_assign_all: in step 4, give a gt every anchor that reaches its max (True) or only the
        first one (False, torch's first-index argmax).
      anchor_valid: ``(N,)`` bool or None. mmdet drops invalid anchors *before* computing IoUs, so they
        take no part in any max (a gt's best anchor is searched among valid anchors only); they get -2.

    Steps (mmdet ``assign_wrt_overlaps``), with IoU = ``box_iou(gt, anchors)`` ``(G, N)``:
      1. every anchor -2 (ignore);
      2. ``0 <= max_iou < neg_iou_thr`` -> -1 (negative);
      3. ``max_iou >= pos_iou_thr`` -> the argmax gt. Ties between gts go to the **lowest** gt index
         (``jnp.argmax``). torch CPU ``max(dim)`` returns the first maximal index too (checked on torch
         2.13); torch documents the same for CUDA, but we have not verified the torch 1.7.1 CUDA kernel
         the reference ran, so exact-tie cases (e.g. duplicate gt boxes) are the only place this can
         differ;
      4. if ``match_low_quality``: for each valid gt ``i`` in order with ``gt_max[i] >= min_pos_iou``,
         every anchor whose IoU with ``i`` equals ``gt_max[i]`` is set to ``i`` (later gts overwrite
         earlier ones). This includes IoU 0 when a gt overlaps no anchor and ``min_pos_iou == 0``
         (RetinaNet): then all its zero-IoU anchors become its positives - an mmdet quirk we keep.
         Vectorised as "the last valid gt whose max equals the anchor's IoU".
      With no valid gt at all every valid anchor is negative (mmdet: all background).

    Returns:
      :class:`AssignResult`.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    n = anchors.shape[0]
    g = gt_boxes.shape[0]
    a_valid = jnp.ones((n,), bool) if anchor_valid is None else jnp.asarray(anchor_valid, bool)
    if g == 0:
        return AssignResult(jnp.where(a_valid, NEGATIVE, IGNORED).astype(jnp.int32),
                            jnp.zeros((n,), jnp.float32))
    gt_valid = jnp.asarray(gt_valid, bool)

    iou = box_iou(gt_boxes, anchors)  # (G, N), mmdet's overlaps layout
    both = gt_valid[:, None] & a_valid[None, :]
    ov = jnp.where(both, iou, -1.0)

    max_iou = jnp.max(ov, axis=0)  # (N,), over valid gts; -1 for invalid anchors / no valid gts
    argmax_gt = jnp.argmax(ov, axis=0).astype(jnp.int32)  # first index on ties
    gt_max = jnp.max(ov, axis=1)  # (G,), over valid anchors; -1 for padded gts

    assigned = jnp.full((n,), IGNORED, jnp.int32)
    assigned = jnp.where((max_iou >= 0) & (max_iou < neg_iou_thr), NEGATIVE, assigned)
    assigned = jnp.where(max_iou >= pos_iou_thr, argmax_gt, assigned)

    if match_low_quality:
        gt_ok = gt_valid & (gt_max >= min_pos_iou)  # (G,)
        if gt_max_assign_all:
            hit = gt_ok[:, None] & (ov == gt_max[:, None]) & a_valid[None, :]  # (G, N)
            last = (g - 1) - jnp.argmax(hit[::-1], axis=0)  # last True along G
            assigned = jnp.where(jnp.any(hit, axis=0), last.astype(jnp.int32), assigned)
        else:
            gt_argmax = jnp.argmax(ov, axis=1)  # (G,), first anchor on ties
            target = jnp.where(gt_ok, gt_argmax, n)  # n = dropped
            last = jnp.full((n,), -1, jnp.int32).at[target].max(
                jnp.arange(g, dtype=jnp.int32), mode="drop")
            assigned = jnp.where(last >= 0, last, assigned)

    any_gt = jnp.any(gt_valid)
    assigned = jnp.where(any_gt, assigned, NEGATIVE)
    assigned = jnp.where(a_valid, assigned, IGNORED)
    raw_max = jnp.max(jnp.where(gt_valid[:, None], iou, -1.0), axis=0)
    raw_max = jnp.where(any_gt, raw_max, 0.0)
    return AssignResult(assigned.astype(jnp.int32), raw_max.astype(jnp.float32))


class SampleResult(NamedTuple):
    """Fixed-size sample of ``num`` anchor/RoI indices, positives first then negatives.

    ``indices`` (num,) int32; ``valid`` (num,) bool; ``is_pos`` (num,) bool (valid positives);
    ``num_pos`` / ``num_neg`` () int32 counts of valid positives / negatives. Invalid slots hold
    index 0 (safe to gather) and must be masked with ``valid``.
    """
    indices: jnp.ndarray
    valid: jnp.ndarray
    is_pos: jnp.ndarray
    num_pos: jnp.ndarray
    num_neg: jnp.ndarray


def _sorted_selection(key_vals: jnp.ndarray, mask: jnp.ndarray, k: int, limit):
    """Random ``k`` of the True entries of ``mask`` (top-k of random keys), ascending by index.

    Returns (idx (k,), ok (k,)) where the first ``min(limit, count)`` slots are valid."""
    n = mask.shape[0]
    k = min(k, n)
    scores = jnp.where(mask, key_vals, -1.0)
    _, idx = jax.lax.top_k(scores, k)
    ok = mask[idx] & (jnp.arange(k) < limit)
    # mmdet's BaseSampler calls ``.unique()``: chosen indices come out sorted ascending.
    sort_key = jnp.where(ok, idx, n)
    order = jnp.argsort(sort_key)
    idx = idx[order]
    ok = ok[order]
    return jnp.where(ok, idx, 0).astype(jnp.int32), ok


def random_sample(key: jax.Array, pos_mask: jnp.ndarray, neg_mask: jnp.ndarray, num: int,
                  pos_fraction: float) -> SampleResult:
    """mmdet ``RandomSampler`` (``neg_pos_ub=-1``) with a static output size.

    Args:
      key: PRNG key.
      pos_mask, neg_mask: ``(N,)`` bool candidates (disjoint).
      num: total sample size (e.g. 256 for the RPN, 512 for the RoI head).
      pos_fraction: at most ``int(num * pos_fraction)`` positives are drawn uniformly without
        replacement; negatives fill up to ``num`` (``num - #pos``).

    Returns:
      :class:`SampleResult` of size ``num``: slots ``[0, num_pos)`` are the positives, the next
      ``num_neg`` slots the negatives, the rest invalid; each group sorted by index as mmdet's
      ``unique()`` does. The randomness (top-k over uniform keys) has mmdet's distribution, not its
      stream.
    """
    pos_mask = jnp.asarray(pos_mask, bool)
    neg_mask = jnp.asarray(neg_mask, bool)
    n = pos_mask.shape[0]
    num_expected_pos = int(num * pos_fraction)
    kp, kn = jax.random.split(key)
    u_pos = jax.random.uniform(kp, (n,))
    u_neg = jax.random.uniform(kn, (n,))
    kpos = max(min(num_expected_pos, n), 0)
    kneg = min(num, n)
    num_pos = jnp.minimum(jnp.sum(pos_mask), num_expected_pos).astype(jnp.int32)
    num_neg = jnp.minimum(jnp.sum(neg_mask), num - num_pos).astype(jnp.int32)
    if kpos > 0:
        pidx, _ = _sorted_selection(u_pos, pos_mask, kpos, num_pos)
    else:
        pidx = jnp.zeros((1,), jnp.int32)
    nidx, nok = _sorted_selection(u_neg, neg_mask, kneg, num_neg)

    slot = jnp.arange(num, dtype=jnp.int32)
    in_pos = slot < num_pos
    p_at = jnp.clip(slot, 0, pidx.shape[0] - 1)
    n_at = jnp.clip(slot - num_pos, 0, nidx.shape[0] - 1)
    in_neg = (~in_pos) & (slot - num_pos < num_neg)
    indices = jnp.where(in_pos, pidx[p_at], jnp.where(in_neg, nidx[n_at], 0))
    valid = in_pos | in_neg
    return SampleResult(indices.astype(jnp.int32), valid, in_pos, num_pos, num_neg)
