"""mmdet 2.x ``AnchorGenerator`` (v2 style) for static canvases (parity_spec.md §3).

Conventions:

* ``base_size = stride`` and ``center_offset = 0``: a base anchor is centred on ``(0, 0)`` and the anchor
  of cell ``(y, x)`` on the cell corner ``(x * stride, y * stride)``. No rounding, no ``+1``.
* ``scale_major=True``: base anchor ``a = ratio_i * n_scales + scale_i``.
* Flat order within a level: ``(y * W + x) * A + a`` (x faster than y); levels are separate arrays
  (concatenate low to high for mmdet's flat order).
* Arithmetic is float32 in mmdet's order (``h_ratios = sqrt(ratios)``, ``w_ratios = 1 / h_ratios``,
  ``ws = base * w_ratios[:, None] * scales[None, :]``, corners ``0 -/+ 0.5 * ws``, anchors
  ``base + float32(shift)``). It is done host-side in numpy float32, which is IEEE round-to-nearest like
  the torch reference (sqrt and division are correctly rounded in both), so the anchors are bit-exact and
  backend-independent. Anchor arrays only depend on static shapes, so they are returned as numpy
  ``float32`` arrays: inside ``jax.jit`` they become constants (wrap with ``jnp.asarray`` if you want a
  device array). Only the validity flags depend on traced values (per-image pad shapes) and are ``jnp``.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

__all__ = [
    "AnchorConfig", "base_anchors", "grid_anchors", "feature_size", "feature_sizes",
    "multilevel_anchors", "retinanet_anchor_config", "rpn_anchor_config", "valid_flags",
    "multilevel_valid_flags",
]


class AnchorConfig(NamedTuple):
    """Anchor generator settings; ``multilevel_anchors(hw, **cfg._asdict())`` works directly.

    ``scales`` are the Python (float64) values mmdet computes before ``torch.Tensor(scales)`` casts them
    to float32; ``base_sizes`` defaults to the strides.
    """
    strides: Tuple[int, ...]
    scales: Tuple[float, ...]
    ratios: Tuple[float, ...]
    base_sizes: Optional[Tuple[int, ...]] = None

    @property
    def num_base_anchors(self) -> int:
        return len(self.scales) * len(self.ratios)


def retinanet_anchor_config() -> AnchorConfig:
    """RetinaNet: ``octave_base_scale=4``, ``scales_per_octave=3``, ratios (0.5, 1, 2), strides 8..128.

    Scales are ``float64(2 ** (k / 3)) * 4`` as mmdet's numpy code computes them; A = 9.
    """
    octave = np.array([2 ** (i / 3) for i in range(3)], dtype=np.float64) * 4
    return AnchorConfig(strides=(8, 16, 32, 64, 128), scales=tuple(float(s) for s in octave),
                        ratios=(0.5, 1.0, 2.0))


def rpn_anchor_config() -> AnchorConfig:
    """Mask R-CNN RPN: scale 8, ratios (0.5, 1, 2), strides 4..64; A = 3."""
    return AnchorConfig(strides=(4, 8, 16, 32, 64), scales=(8.0,), ratios=(0.5, 1.0, 2.0))


def base_anchors(base_size: int, scales: Sequence[float], ratios: Sequence[float],
                 center_offset: float = 0.0) -> np.ndarray:
    """Base anchors of one level, ``(A, 4)`` float32 with ``A = len(ratios) * len(scales)``.

    Row ``ratio_i * len(scales) + scale_i`` (scale-major) is
    ``(c - 0.5 * ws, c - 0.5 * hs, c + 0.5 * ws, c + 0.5 * hs)`` with ``c = center_offset * base_size``,
    ``ws = base_size * (1 / sqrt(ratio)) * scale`` and ``hs = base_size * sqrt(ratio) * scale`` (float32,
    left-to-right products as mmdet).
    """
    scales_t = np.asarray(scales, dtype=np.float64).astype(np.float32)
    ratios_t = np.asarray(ratios, dtype=np.float64).astype(np.float32)
    w = base_size
    h = base_size
    cx = np.float32(center_offset * w)
    cy = np.float32(center_offset * h)
    h_ratios = np.sqrt(ratios_t)
    w_ratios = np.float32(1) / h_ratios
    ws = ((np.float32(w) * w_ratios[:, None]) * scales_t[None, :]).reshape(-1)
    hs = ((np.float32(h) * h_ratios[:, None]) * scales_t[None, :]).reshape(-1)
    half = np.float32(0.5)
    out = np.stack([cx - half * ws, cy - half * hs, cx + half * ws, cy + half * hs], axis=-1)
    return out.astype(np.float32)


def grid_anchors(feat_hw: Tuple[int, int], stride: int, base: np.ndarray) -> np.ndarray:
    """All anchors of one level: ``(H * W * A, 4)`` float32, row ``(y * W + x) * A + a``.

    Args:
      feat_hw: ``(H, W)`` feature-map size (static ints).
      stride: the level's stride; cell ``(y, x)`` is shifted by ``(x * stride, y * stride)``.
      base: ``(A, 4)`` base anchors from :func:`base_anchors`.
    """
    fh, fw = int(feat_hw[0]), int(feat_hw[1])
    base = np.asarray(base, np.float32)
    sx = (np.arange(fw, dtype=np.int64) * stride).astype(np.float32)
    sy = (np.arange(fh, dtype=np.int64) * stride).astype(np.float32)
    xx = np.tile(sx, fh)  # x fastest
    yy = np.repeat(sy, fw)
    shifts = np.stack([xx, yy, xx, yy], axis=-1)  # (H*W, 4)
    return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4).astype(np.float32)


def feature_size(image_hw: Tuple[int, int], stride: int) -> Tuple[int, int]:
    """``(ceil(H / stride), ceil(W / stride))``: the FPN level size for a padded canvas.

    Exact for strides dividing the canvas (the 32-padding makes this so up to stride 32); for the
    stride-64/128 levels (3x3 s2 p1 convs for RetinaNet's P6/P7, or ``max_pool(1, 2)`` for the RPN's P6)
    each halving gives ``ceil``, and ``ceil(ceil(H/64)/2) == ceil(H/128)``.
    """
    return (-(-int(image_hw[0]) // stride), -(-int(image_hw[1]) // stride))


def feature_sizes(image_hw: Tuple[int, int], strides: Sequence[int]) -> List[Tuple[int, int]]:
    """:func:`feature_size` for every stride."""
    return [feature_size(image_hw, s) for s in strides]


def multilevel_anchors(image_hw: Tuple[int, int], strides: Sequence[int], scales: Sequence[float],
                       ratios: Sequence[float], base_sizes: Optional[Sequence[int]] = None,
                       feat_hws: Optional[Sequence[Tuple[int, int]]] = None) -> List[np.ndarray]:
    """Anchors of every level for a (padded) canvas ``image_hw = (H, W)``.

    Returns a list over levels of ``(H_l * W_l * A, 4)`` float32 arrays, ``(H_l, W_l)`` =
    ``feature_size(image_hw, stride_l)`` unless ``feat_hws`` is given.
    """
    if base_sizes is None:
        base_sizes = strides
    if feat_hws is None:
        feat_hws = feature_sizes(image_hw, strides)
    return [grid_anchors(fhw, s, base_anchors(b, scales, ratios))
            for fhw, s, b in zip(feat_hws, strides, base_sizes)]


def valid_flags(feat_hw: Tuple[int, int], pad_hw, stride: int, num_base_anchors: int = 1) -> jnp.ndarray:
    """Anchor validity of one level for one image (mmdet ``single_level_valid_flags``).

    Args:
      feat_hw: static ``(H_l, W_l)`` of the level (from the batch canvas).
      pad_hw: the image's own ``pad_shape[:2]`` ``(pad_h, pad_w)``: Python ints or a traced int array
        ``(2,)``.
      stride: level stride.
      num_base_anchors: A.

    Returns:
      ``(H_l * W_l * A,)`` bool, flat order ``(y * W_l + x) * A + a``; a cell is valid iff
      ``y < min(ceil(pad_h / stride), H_l)`` and ``x < min(ceil(pad_w / stride), W_l)``. With
      ``allowed_border = -1`` mmdet's ``inside_flags`` equal these flags.
    """
    fh, fw = int(feat_hw[0]), int(feat_hw[1])
    pad = jnp.asarray(pad_hw).astype(jnp.int32)
    vh = jnp.minimum((pad[0] + stride - 1) // stride, fh)
    vw = jnp.minimum((pad[1] + stride - 1) // stride, fw)
    vy = jnp.arange(fh) < vh
    vx = jnp.arange(fw) < vw
    v = (vy[:, None] & vx[None, :]).reshape(-1)
    return jnp.repeat(v, num_base_anchors)


def multilevel_valid_flags(feat_hws: Sequence[Tuple[int, int]], pad_hw, strides: Sequence[int],
                           num_base_anchors: int) -> List[jnp.ndarray]:
    """:func:`valid_flags` for every level; list of ``(H_l * W_l * A,)`` bool."""
    return [valid_flags(fhw, pad_hw, s, num_base_anchors) for fhw, s in zip(feat_hws, strides)]
