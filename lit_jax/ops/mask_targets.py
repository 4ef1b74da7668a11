"""Mask R-CNN mask targets resampled from per-GT mask crops (static shapes; design.md "Mask targets").

What mmdet 2.11 computes (``FCNMaskHead.get_targets`` -> ``mask_target_single`` ->
``BitmapMasks.crop_and_resize``; parity_spec.md §10), per image and per positive RoI ``r`` assigned to gt ``i``:

1. clip the RoI ``(x1, y1, x2, y2)`` (proposal box in the resized, flipped, padded image's pixels) to
   ``[0, pad_w] x [0, pad_h]``;
2. ``t = roi_align(M_i, r, 28, spatial_scale=1, sampling_ratio=0, 'avg', aligned=True)`` where ``M_i`` is gt ``i``'s
   FULL-RESOLUTION binary mask of shape ``pad_shape`` (adaptive ``ceil(roi / 28)`` samples per bin and axis);
3. target = ``t >= 0.5`` (float).

What we compute instead
-----------------------
The input pipeline does not ship ``M_i`` (a ``pad_h x pad_w`` bitmap per gt); it ships ``C_i``, an ``(m, m)`` crop of
``M_i`` over gt ``i``'s own box ``g = (gx1, gy1, gx2, gy2)``: ``C_i = roi_align(M_i, g, m, 1, 0, 'avg', True)``,
either binarised (``>= 0.5``, {0, 1}) or as 255 levels (``round(255 * v)``, see ``transforms.mask_crops``). So crop
pixel ``(i, j)`` is the mean of ``M_i`` over the image rectangle
``[gx1 + j * gw / m, gx1 + (j + 1) * gw / m] x [gy1 + i * gh / m, gy1 + (i + 1) * gh / m]`` with
``gw = gx2 - gx1``, ``gh = gy2 - gy1``. Image coordinates here are continuous (pixel ``k`` covers ``[k, k + 1]``, the
frame in which boxes and mmcv's ``aligned=True`` RoIs live).

We reconstruct ``M_i`` near the RoI as the bilinear interpolant of ``C_i`` and run the same roi_align on it: every
(clipped) RoI is mapped into the crop's continuous frame,

    u = (X - gx1) * m / gw (+ 1 with the zero border, below),   v = (Y - gy1) * m / gh (+ 1),

and pooled with :func:`lit_jax.ops.roi_align.roi_align` over the crops as a ``(G, m', m', 1)`` feature batch
(batch index = assigned gt, ``spatial_scale = 1``, ``aligned=True``, ``sampling_ratio=0``, i.e. the adaptive
``ceil(roi_in_crop_pixels / out)`` grid), then binarised with ``>= 0.5``. This is exact (equal to mmcv on the full
mask) only where the full-resolution bin means are recovered from the crop, e.g. RoI == gt box with float
(unquantised) crops and box sides that are multiples of ``m`` (each 28-bin then averages 2 x 2 whole crop pixels,
sampled at exactly the full-resolution bin's points); otherwise it is an
approximation whose error is a band of about one crop pixel (``gw / m`` image pixels) along the mask's boundary:
the crop box-filters ``M_i`` at ``gw / m`` resolution, binary crops additionally quantise it, and bilinear
interpolation of a box-filtered signal is smoother than the box filter of the target bin. Measured agreement
with full-resolution targets on the synthetic COCO set at (1333, 800), m = 56, RoIs with IoU >= 0.5
(``tests/ops/test_mask_targets.py``; 2030 RoIs): mean per-RoI IoU 0.979 with binary crops (a 28-bin over 2 x 2
binary crop pixels with 2 on is a 0.5 tie, and sub-crop-pixel coverage is lost) and 0.996 with 255-level crops
(``DataConfig.mask_binary=False``, same uint8 storage), the recommended setting.

Outside the gt box (RoIs larger than or shifted from their gt box): the crop carries no information there.
By default (``zero_border=True``) the crop is surrounded by one ring of zeros before pooling, so the reconstructed
mask falls linearly from the border crop pixel (centre half a crop pixel inside the box edge) to 0 half a crop pixel
outside it: a mask that fills the box up to its edge crosses 0.5 at the box edge, as the full-resolution mask does
(the gt box is the mask's tight box up to the resize rounding). With ``zero_border=False`` the crop is pooled as is,
with mmcv's edge rules on an ``m x m`` map: samples at crop pixel index ``[-1, 0)`` or ``(m - 1, m]`` take the
border row/column (no interpolation toward 0), farther ones are 0, which pushes a full border half a crop pixel
outward (measured in the test module; slightly worse).

Static sample grid: positives have ``IoU(roi, gt) >= 0.5`` (mmdet's MaxIoUAssigner with pos_iou_thr = min_pos_iou
= 0.5), which bounds every RoI side by twice the gt side: ``IoU >= 0.5`` gives
``gw * roi_h >= iw * ih >= 0.5 * union >= 0.5 * roi_w * roi_h``, so ``roi_w <= 2 * gw`` (and clipping only shrinks
the RoI). In the crop frame a positive RoI is therefore at most ``2 m`` crop pixels wide and tall, and its adaptive
grid is at most ``ceil(2 m / out)`` samples per bin axis (4 for m = 56, out = 28): the default ``max_samples`` makes
the adaptive grid exact for every positive. Larger (non-positive) RoIs are sampled with a capped grid (see
``roi_align``), which only matters for outputs that callers ignore. Cost per RoI: ``out^2 * G^2 * 4`` gathers of
one float (28 x 28 x 16 x 4 = 50 k) -- negligible next to the mask head.

Degenerate gt boxes (``gw <= 0`` or ``gh <= 0``; their crops are all 0 in the pipeline): no division by zero (the
scale uses a safe denominator) and the target is all 0. mmdet can never make such a gt a positive (its IoU with any
RoI is 0).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from lit_jax.ops.roi_align import roi_align

__all__ = ["mask_targets_from_crops", "batched_mask_targets_from_crops", "resample_crops", "default_crop_grid"]


def default_crop_grid(crop_size: int, out_size: int) -> int:
    """Static max samples per bin axis, ``ceil(2 * m / out)``: exact adaptive grid for every RoI with IoU >= 0.5."""
    return max(1, int(math.ceil(2.0 * crop_size / out_size)))


def _to_crop_frame(crop_boxes, rois, gt_index, pad_hw, m: int, border: int):
    """Clipped RoIs in their gt crop's continuous pixel frame.

    Args:
      crop_boxes: ``(G, 4)`` float32 gt boxes ``(x1, y1, x2, y2)`` the crops cover (image pixels).
      rois: ``(R, 4)`` float32 RoIs ``(x1, y1, x2, y2)`` (image pixels).
      gt_index: ``(R,)`` int32 crop of each RoI (clipped to ``[0, G - 1]``).
      pad_hw: ``(2,)`` the image's pad shape ``(h, w)``; RoIs are clipped to ``[0, w] x [0, h]`` (mmdet).
      m: crop side; border: zero pixels added on each side of the crop (0 or 1).

    Returns:
      ``(rois_crop (R, 4) float32, valid (R,) bool)``: ``u = (X - gx1) * m / gw + border`` (same for y), and whether
      the assigned gt box has a positive width and height.
    """
    g = crop_boxes.shape[0]
    gi = jnp.clip(gt_index.astype(jnp.int32), 0, g - 1)
    gb = jnp.take(crop_boxes, gi, axis=0)  # (R, 4)
    gw = gb[:, 2] - gb[:, 0]
    gh = gb[:, 3] - gb[:, 1]
    valid = (gw > 0) & (gh > 0)
    sx = jnp.float32(m) / jnp.where(valid, gw, 1.0)
    sy = jnp.float32(m) / jnp.where(valid, gh, 1.0)
    pad_h = pad_hw[0].astype(jnp.float32)
    pad_w = pad_hw[1].astype(jnp.float32)
    x1 = jnp.clip(rois[:, 0], 0.0, pad_w)
    y1 = jnp.clip(rois[:, 1], 0.0, pad_h)
    x2 = jnp.clip(rois[:, 2], 0.0, pad_w)
    y2 = jnp.clip(rois[:, 3], 0.0, pad_h)
    b = jnp.float32(border)
    u1 = (x1 - gb[:, 0]) * sx + b
    u2 = (x2 - gb[:, 0]) * sx + b
    v1 = (y1 - gb[:, 1]) * sy + b
    v2 = (y2 - gb[:, 1]) * sy + b
    return jnp.stack([u1, v1, u2, v2], axis=1), valid


def resample_crops(crops, crop_boxes, rois, gt_index, pad_hw, out_size: int = 28, crop_scale: float = 1.0, *,
                   max_samples: Optional[int] = None, zero_border: bool = True) -> jnp.ndarray:
    """Soft mask targets ``(R, out, out)`` float32 in [0, 1] (before the ``>= 0.5``) for ONE image.

    Arguments as :func:`mask_targets_from_crops`. Row ``r`` is mmcv's aligned roi_align (adaptive grid, capped at
    ``max_samples``) of crop ``gt_index[r]`` (scaled by ``crop_scale``, zero-bordered if ``zero_border``) on RoI ``r``
    clipped to the pad shape and mapped into the crop frame (module docstring); 0 where the gt box is degenerate.
    """
    crops = jnp.asarray(crops)
    if crops.ndim != 3 or crops.shape[1] != crops.shape[2]:
        raise ValueError(f"crops must be (G, m, m), got {crops.shape}")
    g, m = crops.shape[0], crops.shape[1]
    rois = jnp.asarray(rois, jnp.float32)
    if rois.ndim != 2 or rois.shape[1] != 4:
        raise ValueError(f"rois must be (R, 4), got {rois.shape}")
    crop_boxes = jnp.asarray(crop_boxes, jnp.float32).reshape(g, 4)
    gt_index = jnp.asarray(gt_index, jnp.int32).reshape(rois.shape[0])
    pad_hw = jnp.asarray(pad_hw).reshape(2)
    border = 1 if zero_border else 0
    grid = default_crop_grid(m, out_size) if max_samples is None else int(max_samples)

    feats = crops.astype(jnp.float32) * jnp.float32(crop_scale)
    if border:
        feats = jnp.pad(feats, ((0, 0), (border, border), (border, border)))
    boxes, valid = _to_crop_frame(crop_boxes, rois, gt_index, pad_hw, m, border)
    gi = jnp.clip(gt_index, 0, g - 1).astype(jnp.float32)
    rois5 = jnp.concatenate([gi[:, None], boxes], axis=1)
    soft = roi_align(feats[..., None], rois5, out_size, 1.0, sampling_ratio=0, aligned=True,
                     max_samples=grid)[..., 0]
    return jnp.where(valid[:, None, None], soft, 0.0)


def mask_targets_from_crops(crops, crop_boxes, rois, gt_index, pad_hw, out_size: int = 28, crop_scale: float = 1.0,
                            *, max_samples: Optional[int] = None, zero_border: bool = True) -> jnp.ndarray:
    """mmdet's binary mask targets of ONE image, resampled from per-GT crops (module docstring for the method).

    Args:
      crops: ``(G, m, m)`` gt mask crops (uint8 or float), crop ``i`` covering ``crop_boxes[i]`` (the pipeline's
        ``gt_masks`` of one image). Values times ``crop_scale`` must be in [0, 1]: ``crop_scale=1`` for binary or
        float crops, ``1 / 255`` for the 255-level crops (``DataConfig.mask_binary=False``).
      crop_boxes: ``(G, 4)`` float gt boxes ``(x1, y1, x2, y2)`` in the padded image's pixels (the batch's
        ``gt_boxes``); a box with zero width or height gives all-0 targets.
      rois: ``(R, 4)`` float RoI boxes ``(x1, y1, x2, y2)`` in the same pixels (the sampled positives).
      gt_index: ``(R,)`` int assigned gt of each RoI; entries of non-positive RoIs may be any value ``>= 0`` (it is
        clipped to ``[0, G - 1]``) and their rows are meaningless.
      pad_hw: ``(2,)`` int the image's pad shape ``(h, w)`` (``pad_shape``, not the batch canvas): mmdet clips
        RoIs to ``[0, w] x [0, h]`` before the roi_align.
      out_size: target side (mmdet's mask head: 28).
      crop_scale: factor mapping crop values to [0, 1].
      max_samples: static max samples per bin axis of the adaptive grid; default :func:`default_crop_grid`
        (exact for every RoI with IoU >= 0.5 to its gt).
      zero_border: pool a crop surrounded by one ring of zeros (default; module docstring).

    Returns:
      ``(R, out, out)`` float32 in {0, 1}: ``resample_crops(...) >= 0.5``. Pure and jit-able (``out_size``,
      ``crop_scale``, ``max_samples`` and ``zero_border`` static); no gradient is meaningful or needed.
    """
    soft = resample_crops(crops, crop_boxes, rois, gt_index, pad_hw, out_size, crop_scale,
                          max_samples=max_samples, zero_border=zero_border)
    return (soft >= 0.5).astype(jnp.float32)


def batched_mask_targets_from_crops(crops, crop_boxes, rois, gt_index, pad_hw, out_size: int = 28,
                                    crop_scale: float = 1.0, *, max_samples: Optional[int] = None,
                                    zero_border: bool = True) -> jnp.ndarray:
    """:func:`mask_targets_from_crops` over a batch of images.

    Args:
      crops: ``(B, G, m, m)``; crop_boxes: ``(B, G, 4)``; rois: ``(B, R, 4)``; gt_index: ``(B, R)`` (indices into
        the image's own ``G`` gts); pad_hw: ``(B, 2)``; the rest as :func:`mask_targets_from_crops`.

    Returns:
      ``(B, R, out, out)`` float32 in {0, 1}.

    ``jax.vmap`` of the single-image function; equal to calling it per image.
    """
    fn = jax.vmap(lambda c, cb, r, gi, p: mask_targets_from_crops(c, cb, r, gi, p, out_size, crop_scale,
                                                                  max_samples=max_samples,
                                                                  zero_border=zero_border))
    return fn(jnp.asarray(crops), jnp.asarray(crop_boxes), jnp.asarray(rois), jnp.asarray(gt_index),
              jnp.asarray(pad_hw))
