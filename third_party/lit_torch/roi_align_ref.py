"""PyTorch reference of mmcv 1.3 ``RoIAlign`` (avg pool) and mmdet 2.11 ``SingleRoIExtractor`` (parity spec section 9).

Test reference only: plain torch, fp32, loops over RoIs.

mmcv rules reproduced (CUDA/CPU kernels agree on them):

* ``aligned=True``: every RoI coordinate becomes ``c * spatial_scale - 0.5``; ``aligned=False``: no offset, and the RoI
  width/height are forced to at least 1;
* bin size ``roi_h / out_h`` (fp32); ``sampling_ratio=0`` gives an ADAPTIVE grid of ``ceil(roi_h / out_h)`` x
  ``ceil(roi_w / out_w)`` samples per bin (computed per RoI), each at ``(k + 0.5) / grid`` of the bin:
  ``y = (start_h + ph * bin_h) + ((iy + 0.5) * bin_h) / grid_h`` (the kernel's fp32 evaluation order);
* ``bilinear_interpolate``: the value is 0 if ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` (so exactly -1 or H is
  still sampled); then ``y, x`` are clamped to ``>= 0``; if ``floor(y) >= H - 1`` the last row is used with no
  interpolation (same for x); value ``w1*v1 + w2*v2 + w3*v3 + w4*v4``;
* output = sum over the bin's samples / ``max(grid_h * grid_w, 1)`` (an empty grid gives 0).

``SingleRoIExtractor``: level ``clamp(floor(log2(sqrt(w*h) / finest_scale + 1e-6)), 0, num_levels - 1)`` with
``w = x2 - x1``, ``h = y2 - y1`` (no +1), i.e. P2 below 112, P3 for [112, 224), P4 for [224, 448), P5 from 448.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch

__all__ = ["bilinear_interpolate_ref", "roi_align_ref", "map_roi_levels_ref", "multilevel_roi_align_ref",
           "ROI_STRIDES", "FINEST_SCALE"]

ROI_STRIDES = (4, 8, 16, 32)
FINEST_SCALE = 56


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        assert len(v) == 2
        return int(v[0]), int(v[1])
    return int(v), int(v)


def bilinear_interpolate_ref(feat: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mmcv ``bilinear_interpolate`` of ``feat`` (C, H, W) at the points ``(y, x)`` (same shape S, fp32).

    Returns (C, *S)."""
    C, H, W = feat.shape
    y = y.float()
    x = x.float()
    outside = (y < -1.0) | (y > H) | (x < -1.0) | (x > W)
    zero = torch.zeros((), dtype=torch.float32)
    y = torch.where(y <= 0, zero, y)
    x = torch.where(x <= 0, zero, x)
    y_low = y.floor().long()  # y >= 0 here, so C's (int) truncation == floor
    x_low = x.floor().long()
    y_last = y_low >= H - 1
    x_last = x_low >= W - 1
    y_low = torch.where(y_last, torch.full_like(y_low, H - 1), y_low)
    x_low = torch.where(x_last, torch.full_like(x_low, W - 1), x_low)
    y = torch.where(y_last, y_low.float(), y)
    x = torch.where(x_last, x_low.float(), x)
    y_high = torch.where(y_last, y_low, y_low + 1)
    x_high = torch.where(x_last, x_low, x_low + 1)
    # `outside` points may carry out-of-range indices (e.g. y = H + 5 -> y_low = H - 1 is fine, but keep it safe)
    y_low = y_low.clamp(0, H - 1)
    y_high = y_high.clamp(0, H - 1)
    x_low = x_low.clamp(0, W - 1)
    x_high = x_high.clamp(0, W - 1)
    ly = y - y_low.float()
    lx = x - x_low.float()
    hy = 1.0 - ly
    hx = 1.0 - lx
    flat = feat.reshape(C, H * W).float()
    v1 = flat[:, (y_low * W + x_low).reshape(-1)].reshape(C, *y.shape)
    v2 = flat[:, (y_low * W + x_high).reshape(-1)].reshape(C, *y.shape)
    v3 = flat[:, (y_high * W + x_low).reshape(-1)].reshape(C, *y.shape)
    v4 = flat[:, (y_high * W + x_high).reshape(-1)].reshape(C, *y.shape)
    w1 = hy * hx
    w2 = hy * lx
    w3 = ly * hx
    w4 = ly * lx
    val = w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
    return torch.where(outside, zero, val)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def roi_align_ref(features: torch.Tensor, rois: torch.Tensor, output_size: Union[int, Sequence[int]],
                  spatial_scale: float, sampling_ratio: int = 0, aligned: bool = True) -> torch.Tensor:
    """mmcv ``roi_align(features, rois, output_size, spatial_scale, sampling_ratio, 'avg', aligned)``.

    ``features``: (N, C, H, W); ``rois``: (R, 5) rows ``[batch_idx, x1, y1, x2, y2]`` in image pixels.
    Returns (R, C, out_h, out_w) float32."""
    out_h, out_w = _pair(output_size)
    N, C, H, W = features.shape
    rois = rois.float()
    R = rois.shape[0]
    out = features.new_zeros((R, C, out_h, out_w), dtype=torch.float32)
    scale = _f32(spatial_scale)
    offset = _f32(0.5 if aligned else 0.0)
    one = _f32(1.0)
    for r in range(R):
        b = int(rois[r, 0].item())
        start_w = rois[r, 1] * scale - offset
        start_h = rois[r, 2] * scale - offset
        end_w = rois[r, 3] * scale - offset
        end_h = rois[r, 4] * scale - offset
        roi_w = end_w - start_w
        roi_h = end_h - start_h
        if not aligned:
            roi_w = torch.maximum(roi_w, one)
            roi_h = torch.maximum(roi_h, one)
        bin_h = roi_h / out_h
        bin_w = roi_w / out_w
        if sampling_ratio > 0:
            grid_h = grid_w = int(sampling_ratio)
        else:
            grid_h = int(math.ceil((roi_h / out_h).item()))  # ceilf of the fp32 quotient
            grid_w = int(math.ceil((roi_w / out_w).item()))
        count = max(grid_h * grid_w, 1)
        if grid_h <= 0 or grid_w <= 0:
            continue  # no samples: the output stays 0
        ph = torch.arange(out_h, dtype=torch.float32)
        pw = torch.arange(out_w, dtype=torch.float32)
        iy = torch.arange(grid_h, dtype=torch.float32) + 0.5
        ix = torch.arange(grid_w, dtype=torch.float32) + 0.5
        ys = (start_h + ph[:, None] * bin_h) + (iy[None, :] * bin_h) / grid_h  # (out_h, grid_h)
        xs = (start_w + pw[:, None] * bin_w) + (ix[None, :] * bin_w) / grid_w  # (out_w, grid_w)
        yy = ys[:, :, None, None].expand(out_h, grid_h, out_w, grid_w)
        xx = xs[None, None, :, :].expand(out_h, grid_h, out_w, grid_w)
        vals = bilinear_interpolate_ref(features[b], yy, xx)  # (C, out_h, grid_h, out_w, grid_w)
        out[r] = vals.sum(dim=(2, 4)) / count
    return out


def map_roi_levels_ref(rois: torch.Tensor, num_levels: int = 4, finest_scale: float = FINEST_SCALE) -> torch.Tensor:
    """mmdet ``SingleRoIExtractor.map_roi_levels``: (R,) int64 level per RoI (rows ``[b, x1, y1, x2, y2]``)."""
    rois = rois.float()
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    lvls = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return lvls.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align_ref(feats: Sequence[torch.Tensor], rois: torch.Tensor, out: Union[int, Sequence[int]],
                             strides: Sequence[int] = ROI_STRIDES, sampling_ratio: int = 0, aligned: bool = True,
                             finest_scale: float = FINEST_SCALE) -> torch.Tensor:
    """mmdet ``SingleRoIExtractor`` (RoIAlign per level, scale ``1/stride``) over the first ``len(strides)`` maps.

    Returns (R, C, out_h, out_w); each RoI is pooled from the level ``map_roi_levels_ref`` picks."""
    num_levels = len(strides)
    feats = list(feats)[:num_levels]
    out_h, out_w = _pair(out)
    C = feats[0].shape[1]
    res = feats[0].new_zeros((rois.shape[0], C, out_h, out_w), dtype=torch.float32)
    if rois.shape[0] == 0:
        return res
    lvls = map_roi_levels_ref(rois, num_levels, finest_scale)
    for i in range(num_levels):
        inds = (lvls == i).nonzero(as_tuple=False).squeeze(1)
        if inds.numel() > 0:
            res[inds] = roi_align_ref(feats[i], rois[inds], (out_h, out_w), 1.0 / strides[i], sampling_ratio,
                                      aligned)
    return res
