"""Box primitives on mmdetection 2.x semantics: IoU, the DeltaXYWH coder, clipping.

Conventions (parity_spec.md §4, §6):

* Boxes are ``(x1, y1, x2, y2)`` in absolute pixels of the resized image, float32.
* There is no ``+1`` anywhere: width = ``x2 - x1``, area = ``w * h``.
* ``hw`` / ``max_shape`` arguments are ``(H, W)`` (rows, columns), as mmdet's ``img_shape[:2]``;
  x is clipped to ``[0, W]`` and y to ``[0, H]``.

All functions are pure ``jnp``, jit-able and vmap-able; the elementwise arithmetic follows the order of
mmdet 2.11's ``bbox_overlaps`` / ``bbox2delta`` / ``delta2bbox`` in float32 so that results are
bit-identical where the backend's float ops are (XLA may still fuse ``a*b+c`` into an FMA on GPU, as nvcc
does in the CUDA reference; that is outside our control and only moves the last bit).
"""
from __future__ import annotations

from typing import Sequence, Union

import jax.numpy as jnp
import numpy as np

__all__ = ["box_iou", "box_area", "encode_deltas", "decode_deltas", "clip_boxes"]

ArrayLike = Union[jnp.ndarray, np.ndarray, Sequence[float]]

# mmdet ``bbox_overlaps`` clamps the union (and the enclosing area for GIoU) to at least this value.
IOU_EPS = 1e-6


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area ``(x2 - x1) * (y2 - y1)`` of boxes ``(..., 4)`` -> ``(...)``; no clamping (as mmdet)."""
    boxes = jnp.asarray(boxes, jnp.float32)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: jnp.ndarray, b: jnp.ndarray, *, eps: float = IOU_EPS) -> jnp.ndarray:
    """Pairwise IoU, mmdet ``bbox_overlaps(a, b, mode='iou', is_aligned=False)``.

    Args:
      a: ``(..., N, 4)`` boxes.
      b: ``(..., M, 4)`` boxes; leading dims broadcast against ``a``'s.
      eps: the union is clamped to ``>= eps`` (mmdet's default 1e-6), so degenerate pairs give 0, not NaN.

    Returns:
      ``(..., N, M)`` float32 IoU. Order of operations: ``area_a + area_b - overlap`` then
      ``overlap / max(union, eps)``, as mmdet (addition is commutative, so ``box_iou(a, b)`` equals
      ``box_iou(b, a).T`` bit for bit).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    area_a = box_area(a)  # (..., N)
    area_b = box_area(b)  # (..., M)
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])  # (..., N, M, 2)
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - overlap
    union = jnp.maximum(union, jnp.float32(eps))
    return overlap / union


def _as_f32_vec(v, n: int = 4) -> jnp.ndarray:
    v = jnp.asarray(v, jnp.float32).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"expected {n} values, got {v.shape[0]}")
    return v


def encode_deltas(proposals: jnp.ndarray, gt: jnp.ndarray,
                  means: ArrayLike = (0.0, 0.0, 0.0, 0.0),
                  stds: ArrayLike = (1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
    """DeltaXYWHBBoxCoder.encode (mmdet ``bbox2delta``).

    Args:
      proposals: ``(..., 4)`` anchors / proposals.
      gt: ``(..., 4)`` target boxes, same shape.
      means, stds: 4 values each; the result is ``(d - means) / stds``.

    Returns:
      ``(..., 4)`` float32 ``(dx, dy, dw, dh)`` with ``dx = (gx - px) / pw``, ``dw = log(gw / pw)``,
      centres ``(x1 + x2) * 0.5`` and widths ``x2 - x1``. Degenerate proposals (``pw == 0``) give
      inf/NaN exactly like mmdet; callers mask them with the target weights.
    """
    p = jnp.asarray(proposals, jnp.float32)
    g = jnp.asarray(gt, jnp.float32)
    px = (p[..., 0] + p[..., 2]) * 0.5
    py = (p[..., 1] + p[..., 3]) * 0.5
    pw = p[..., 2] - p[..., 0]
    ph = p[..., 3] - p[..., 1]
    gx = (g[..., 0] + g[..., 2]) * 0.5
    gy = (g[..., 1] + g[..., 3]) * 0.5
    gw = g[..., 2] - g[..., 0]
    gh = g[..., 3] - g[..., 1]
    dx = (gx - px) / pw
    dy = (gy - py) / ph
    dw = jnp.log(gw / pw)
    dh = jnp.log(gh / ph)
    d = jnp.stack([dx, dy, dw, dh], axis=-1)
    return (d - _as_f32_vec(means)) / _as_f32_vec(stds)


def _max_xy(max_shape, batch_ndim: int) -> jnp.ndarray:
    """``max_shape`` (H, W[, C]) or (B, 2|3) -> ``[W, H, W, H]`` broadcastable to ``(..., 4)`` boxes.

    ``batch_ndim`` is the number of box-array dims before the last one (``boxes.ndim - 1``).
    """
    ms = jnp.asarray(max_shape, jnp.float32)[..., :2]
    xy = jnp.concatenate([ms[..., 1:2], ms[..., 0:1]], axis=-1)  # (W, H)
    xy = jnp.concatenate([xy, xy], axis=-1)  # (..., 4) = W, H, W, H
    if xy.ndim > 1:
        # Per-batch shapes (B, 4): insert singleton axes between the batch axis and the box axis.
        extra = batch_ndim - (xy.ndim - 1)
        if extra < 0:
            raise ValueError("max_shape has more leading dims than the boxes")
        xy = xy.reshape(xy.shape[:-1] + (1,) * extra + (4,))
    return xy


def _clip_where(boxes: jnp.ndarray, max_xy: jnp.ndarray) -> jnp.ndarray:
    # mmdet: torch.where(b < 0, 0, b); torch.where(b > max, max, b)  (NaN passes through unchanged).
    zero = jnp.float32(0.0)
    boxes = jnp.where(boxes < zero, zero, boxes)
    return jnp.where(boxes > max_xy, max_xy, boxes)


def clip_boxes(boxes: jnp.ndarray, hw) -> jnp.ndarray:
    """Clip ``(..., 4)`` boxes: x to ``[0, W]``, y to ``[0, H]``.

    Args:
      boxes: ``(..., 4)``.
      hw: ``(H, W)`` (or mmdet's ``img_shape`` ``(H, W, C)``): static tuple, or a traced array of
        shape ``(2,)``; or ``(B, 2)`` for boxes ``(B, ..., 4)`` (one shape per leading batch item).
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    return _clip_where(boxes, _max_xy(hw, boxes.ndim - 1))


def decode_deltas(anchors: jnp.ndarray, deltas: jnp.ndarray,
                  means: ArrayLike = (0.0, 0.0, 0.0, 0.0),
                  stds: ArrayLike = (1.0, 1.0, 1.0, 1.0),
                  max_shape=None, wh_ratio_clip: float = 16 / 1000) -> jnp.ndarray:
    """DeltaXYWHBBoxCoder.decode (mmdet 2.11 ``delta2bbox``, ``clip_border=True``).

    Args:
      anchors: ``(..., 4)`` base boxes (anchors or RoIs).
      deltas: ``(..., 4 * K)``, ``K >= 1`` (``K`` > 1 for class-specific RCNN deltas, ``k * 4 + j``
        layout); leading dims broadcast against ``anchors``'.
      means, stds: 4 values each, repeated over the ``K`` groups; ``d = deltas * stds + means``.
      max_shape: ``None`` (no clipping) or ``(H, W[, C])`` static / traced ``(2,)`` array, or
        ``(B, 2)`` for ``(B, N, 4K)`` inputs. x is clipped to ``[0, W]``, y to ``[0, H]``.
      wh_ratio_clip: ``dw`` and ``dh`` are clamped to ``+-|log(wh_ratio_clip)|`` (float32 of
        4.135166556742356 for the default); ``dx`` and ``dy`` are not clamped.

    Returns:
      ``(..., 4 * K)`` float32 boxes ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)`` with
      ``cx = px + pw * dx`` and ``w = pw * exp(dw)``.
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    deltas = jnp.asarray(deltas, jnp.float32)
    if deltas.shape[-1] % 4:
        raise ValueError("deltas' last dim must be a multiple of 4")
    k = deltas.shape[-1] // 4
    d = deltas.reshape(deltas.shape[:-1] + (k, 4))
    d = d * _as_f32_vec(stds) + _as_f32_vec(means)
    dx, dy, dw, dh = d[..., 0], d[..., 1], d[..., 2], d[..., 3]  # (..., K)

    x1, y1, x2, y2 = (anchors[..., i][..., None] for i in range(4))  # (..., 1)
    px = (x1 + x2) * 0.5
    py = (y1 + y2) * 0.5
    pw = x2 - x1
    ph = y2 - y1
    dx_width = pw * dx
    dy_height = ph * dy
    max_ratio = jnp.float32(np.abs(np.log(wh_ratio_clip)))
    dw = jnp.clip(dw, -max_ratio, max_ratio)
    dh = jnp.clip(dh, -max_ratio, max_ratio)
    gw = pw * jnp.exp(dw)
    gh = ph * jnp.exp(dh)
    gx = px + dx_width
    gy = py + dy_height
    bx1 = gx - gw * 0.5
    by1 = gy - gh * 0.5
    bx2 = gx + gw * 0.5
    by2 = gy + gh * 0.5
    boxes = jnp.stack([bx1, by1, bx2, by2], axis=-1)  # (..., K, 4)
    if max_shape is not None:
        if np.ndim(max_shape) > 1:  # (B, 2): one shape per leading batch item
            max_xy = _max_xy(max_shape, boxes.ndim - 2)[..., None, :]  # (B, 1.., 1, 4) over (B, N, K, 4)
        else:
            max_xy = _max_xy(max_shape, 0)
        boxes = _clip_where(boxes, max_xy)
    return boxes.reshape(boxes.shape[:-2] + (4 * k,))
