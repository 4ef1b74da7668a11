"""PyTorch-compatible separable resizes (bilinear and bicubic, ``align_corners=False``, no antialias).

``jax.image.resize`` is NOT a drop-in replacement:

* it antialiases when downsampling unless ``antialias=False`` is passed;
* its ``'cubic'`` method is the Keys kernel with ``a = -0.5`` and renormalises the weights at the borders, whereas
  torch's bicubic uses ``A = -0.75`` and clamps the out-of-range taps onto the border pixel.

The resizes here are expressed as dense ``(out, in)`` interpolation matrices (built once in numpy, float64, at trace
time since sizes are static) that are applied with two einsums, first along H and then along W.  This reproduces
``torch.nn.functional.interpolate(x, size=(out_h, out_w), mode=..., align_corners=False)`` exactly up to fp32 rounding.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["bilinear_weights", "bicubic_weights", "resize_bilinear", "resize_bicubic"]

# torch's cubic convolution coefficient (aten/src/ATen/native/UpSample.h, ``get_cubic_upsample_coefficients``).
_CUBIC_A = -0.75


def _check_sizes(in_size: int, out_size: int) -> tuple[int, int]:
    in_size, out_size = int(in_size), int(out_size)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    return in_size, out_size


def _source_coords(in_size: int, out_size: int, coord_dtype) -> np.ndarray:
    """torch's source coordinate for ``align_corners=False``, unclamped: ``scale * (dst + 0.5) - 0.5``.

    ``scale = in / out``. torch evaluates this in its "opmath" type: float32 for float32/bf16/fp16 inputs (as a
    fused multiply-add on both the CPU and CUDA builds), float64 for float64 inputs. ``coord_dtype`` selects which
    one to reproduce; the float32 emulation is exact (one rounding of the exact ``scale * (dst + 0.5) - 0.5``, which
    float64 holds exactly for float32 operands). The result is returned as float64 either way.
    """
    dst = np.arange(out_size, dtype=np.float64) + 0.5
    if np.dtype(coord_dtype) == np.float32:
        scale = np.float64(np.float32(in_size) / np.float32(out_size))
        return (scale * dst - 0.5).astype(np.float32).astype(np.float64)
    if np.dtype(coord_dtype) == np.float64:
        return (in_size / out_size) * dst - 0.5
    raise ValueError(f"coord_dtype must be float32 or float64, got {coord_dtype}")


def _index_and_lambda(src: np.ndarray, in_size: int, coord_dtype):
    """torch ``guard_index_and_lambda``: ``i = min(floor(src), in-1)``, ``lam = clip(src - i, 0, 1)`` (in coord_dtype)."""
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - idx, 0.0, 1.0).astype(coord_dtype).astype(np.float64)  # src - idx is exact in float64
    return idx, lam


def bilinear_weights(in_size: int, out_size: int, coord_dtype=np.float32) -> np.ndarray:
    """Interpolation matrix of torch 1-D linear resampling (``mode='bilinear'``, ``align_corners=False``).

    Returns a float64 array ``M`` of shape ``(out_size, in_size)`` such that ``y = M @ x`` resizes ``x`` along one
    axis exactly as torch does, for both up- and downsampling, with no antialiasing (torch never antialiases unless
    ``antialias=True``):

    * ``src = max((dst + 0.5) * in / out - 0.5, 0)`` (clamped at 0);
    * ``lo = floor(src)``, ``hi = min(lo + 1, in - 1)``, ``lam = src - lo``;
    * ``y[dst] = (1 - lam) * x[lo] + lam * x[hi]``.

    When ``in_size == out_size`` this is the identity.

    ``coord_dtype`` (float32 or float64) is the precision in which torch computes ``src`` and ``lam``: float32 for
    float32 tensors (the default; the LIT reference runs in fp32), float64 for float64 tensors. With the matching
    choice the matrix equals torch's weights to the last bit; the two choices differ by up to ~1e-5 for ~100 px
    axes (float32 rounding of ``src``), which is the inherent fp32 noise of torch's own result. With float32 the
    entries are float32-representable values (stored as float64).
    """
    in_size, out_size = _check_sizes(in_size, out_size)
    src = np.maximum(_source_coords(in_size, out_size, coord_dtype), 0.0)
    lo, lam = _index_and_lambda(src, in_size, coord_dtype)
    hi = np.minimum(lo + 1, in_size - 1)
    w = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(w, (rows, lo), (1.0 - lam).astype(coord_dtype).astype(np.float64))  # torch: lambda0 = 1 - lambda1
    np.add.at(w, (rows, hi), lam)
    return w.astype(coord_dtype).astype(np.float64)


def _cubic_conv1(x: np.ndarray, a: float) -> np.ndarray:
    """Cubic convolution kernel for ``|x| <= 1``."""
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0


def _cubic_conv2(x: np.ndarray, a: float) -> np.ndarray:
    """Cubic convolution kernel for ``1 < |x| < 2``."""
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a


def bicubic_weights(in_size: int, out_size: int, coord_dtype=np.float32) -> np.ndarray:
    """Interpolation matrix of torch 1-D cubic resampling (``mode='bicubic'``, ``align_corners=False``).

    Returns a float64 array ``M`` of shape ``(out_size, in_size)`` such that ``y = M @ x`` matches torch, for both
    up- and downsampling, with no antialiasing:

    * ``src = (dst + 0.5) * in / out - 0.5`` (NOT clamped, unlike bilinear);
    * ``f = floor(src)``, ``t = src - f``; taps ``f-1, f, f+1, f+2`` with weights
      ``[k2(t+1), k1(t), k1(1-t), k2(2-t)]`` where ``k1``/``k2`` are the cubic convolution kernel pieces with
      ``A = -0.75``;
    * tap indices are CLAMPED to ``[0, in-1]``, so the weights of out-of-range taps accumulate on the border pixel
      (no renormalisation).

    When ``in_size == out_size`` this is the identity (``t = 0`` gives weights ``[0, 1, 0, 0]``).

    ``coord_dtype``: as in :func:`bilinear_weights` (the precision of ``src`` and ``t``; the cubic coefficients are
    then evaluated in float64, within ~1 float32 ulp of torch's).
    """
    in_size, out_size = _check_sizes(in_size, out_size)
    src = _source_coords(in_size, out_size, coord_dtype)
    f, t = _index_and_lambda(src, in_size, coord_dtype)
    coeffs = (
        _cubic_conv2(t + 1.0, _CUBIC_A),
        _cubic_conv1(t, _CUBIC_A),
        _cubic_conv1(1.0 - t, _CUBIC_A),
        _cubic_conv2(2.0 - t, _CUBIC_A),
    )
    w = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    for k, c in enumerate(coeffs):
        idx = np.clip(f - 1 + k, 0, in_size - 1)
        np.add.at(w, (rows, idx), c)
    return w.astype(coord_dtype).astype(np.float64)


def _apply_separable(x, w_h: np.ndarray, w_w: np.ndarray):
    """Apply ``(out_h, H)`` and ``(out_w, W)`` matrices to the H and W axes of a ``(..., H, W, C)`` array."""
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"expected (..., H, W, C), got shape {x.shape}")
    if x.shape[-3] != w_h.shape[1] or x.shape[-2] != w_w.shape[1]:
        raise ValueError(f"weight shapes {w_h.shape}, {w_w.shape} do not match input {x.shape}")
    out_dtype = x.dtype
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xc = x.astype(compute_dtype)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,...hwc->...owc", jnp.asarray(w_h, jnp.float32).astype(compute_dtype), xc, precision=hi)
    y = jnp.einsum("pw,...owc->...opc", jnp.asarray(w_w, jnp.float32).astype(compute_dtype), y, precision=hi)
    return y.astype(out_dtype)


def _out_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"size must be (out_h, out_w), got {size}")
    return int(size[0]), int(size[1])


def resize_bilinear(x, size: Sequence[int]):
    """torch ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialias) on a channels-last array.

    Args:
      x: array of shape ``(..., H, W, C)``.
      size: static ``(out_h, out_w)``.

    Returns:
      array of shape ``(..., out_h, out_w, C)`` in ``x.dtype`` (computed in at least float32 with HIGHEST precision).
      Equals ``x`` when ``size == (H, W)``. See :func:`bilinear_weights` for the exact semantics.
    """
    out_h, out_w = _out_size(size)
    return _apply_separable(x, bilinear_weights(x.shape[-3], out_h), bilinear_weights(x.shape[-2], out_w))


def resize_bicubic(x, size: Sequence[int]):
    """torch ``F.interpolate(mode='bicubic', align_corners=False)`` (A = -0.75, clamped taps, no antialias).

    Args:
      x: array of shape ``(..., H, W, C)``.
      size: static ``(out_h, out_w)``.

    Returns:
      array of shape ``(..., out_h, out_w, C)`` in ``x.dtype`` (computed in at least float32 with HIGHEST precision).
      Equals ``x`` when ``size == (H, W)``. See :func:`bicubic_weights` for the exact semantics.
    """
    out_h, out_w = _out_size(size)
    return _apply_separable(x, bicubic_weights(x.shape[-3], out_h), bicubic_weights(x.shape[-2], out_w))
