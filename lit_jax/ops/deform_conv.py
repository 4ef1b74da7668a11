"""Deformable convolution v1 (mmcv ``DeformConv2d`` / ``torchvision.ops.deform_conv2d`` semantics), pure JAX.

One offset group, one conv group, no dilation, no modulation mask. Channels-last (NHWC / HWIO) layout.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

__all__ = ["deform_conv2d"]

IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v  # type: ignore[return-value]


def deform_conv2d(
    x,
    offsets,
    kernel,
    bias: Optional[jax.Array] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
):
    """DCNv1 forward with the mmcv / torchvision sampling rules.

    Args:
      x: ``(B, H, W, Cin)`` input (NHWC).
      offsets: ``(B, Ho, Wo, 2*kh*kw)``; channel ``2*(i*kw + j)`` is ``dy`` and ``2*(i*kw + j) + 1`` is ``dx`` for
        kernel tap ``(i, j)`` (torch's ``(B, 2*kh*kw, Ho, Wo)`` offset tensor transposed to channels-last).
      kernel: ``(kh, kw, Cin, Cout)`` (HWIO; torch ``(Cout, Cin, kh, kw)`` transposed by ``(2, 3, 1, 0)``).
      bias: ``(Cout,)`` or None.
      stride: int or ``(sh, sw)``.
      padding: int or ``(ph, pw)`` (symmetric zero padding).

    Returns:
      float32 ``(B, Ho, Wo, Cout)`` with ``Ho = (H + 2*ph - kh)//sh + 1`` and ``Wo = (W + 2*pw - kw)//sw + 1``.

    Semantics, for output ``(ho, wo)`` and tap ``(i, j)``:

    * sample point ``h = ho*sh - ph + i + dy``, ``w = wo*sw - pw + j + dx`` (float32);
    * the sample is 0 unless ``-1 < h < H`` and ``-1 < w < W``;
    * otherwise it is bilinear from the corners ``(floor(h) + {0,1}, floor(w) + {0,1})``, where any corner outside
      ``[0, H-1] x [0, W-1]`` contributes 0 (zero padding, no renormalisation);
    * ``out = bias + sum_{i, j, cin} kernel[i, j, cin, :] * sample[i, j, cin]``.

    (For finite coordinates the validity window is implied by the zero corners: at ``h <= -1`` or ``h >= H`` every
    corner with nonzero weight is off the map. It is kept to mirror mmcv and to keep huge offsets safe to index.)

    All arithmetic is float32 with HIGHEST matmul precision. Differentiable w.r.t. all array arguments (the offset
    gradient is the piecewise-bilinear one, zero outside the validity window, as in mmcv).
    """
    return _deform_conv2d(x, offsets, kernel, bias, _pair(stride, "stride"), _pair(padding, "padding"))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _deform_conv2d(x, offsets, kernel, bias, stride: tuple[int, int], padding: tuple[int, int]):
    """Jitted body of :func:`deform_conv2d` (inlined when called under an outer jit; fast in eager mode)."""
    sh, sw = stride
    ph, pw = padding
    x = jnp.asarray(x, jnp.float32)
    offsets = jnp.asarray(offsets, jnp.float32)
    kernel = jnp.asarray(kernel, jnp.float32)

    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, Cin), got {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be (kh, kw, Cin, Cout), got {kernel.shape}")
    b, h_in, w_in, cin = x.shape
    kh, kw, kcin, cout = kernel.shape
    if kcin != cin:
        raise ValueError(f"kernel Cin {kcin} != input Cin {cin}")
    ho = (h_in + 2 * ph - kh) // sh + 1
    wo = (w_in + 2 * pw - kw) // sw + 1
    ntap = kh * kw
    if offsets.shape != (b, ho, wo, 2 * ntap):
        raise ValueError(f"offsets must have shape {(b, ho, wo, 2 * ntap)}, got {offsets.shape}")

    off = offsets.reshape(b, ho, wo, ntap, 2)
    dy, dx = off[..., 0], off[..., 1]  # (B, Ho, Wo, K)

    # Integer base positions of every (output pixel, tap), exactly representable in float32.
    ti = jnp.repeat(jnp.arange(kh), kw)  # tap k = i*kw + j -> i
    tj = jnp.tile(jnp.arange(kw), kh)  # -> j
    base_h = (jnp.arange(ho)[:, None] * sh - ph + ti[None, :]).astype(jnp.float32)  # (Ho, K)
    base_w = (jnp.arange(wo)[:, None] * sw - pw + tj[None, :]).astype(jnp.float32)  # (Wo, K)
    ph_ = base_h[None, :, None, :] + dy  # (B, Ho, Wo, K)
    pw_ = base_w[None, None, :, :] + dx

    valid = (ph_ > -1.0) & (ph_ < float(h_in)) & (pw_ > -1.0) & (pw_ < float(w_in))
    h0f = jnp.floor(ph_)
    w0f = jnp.floor(pw_)
    lh = ph_ - h0f
    lw = pw_ - w0f
    # Outside the validity window the sample is 0; clamp the (unused) coordinates there so the int cast is safe
    # for arbitrarily large offsets.
    h0 = jnp.where(valid, h0f, -2.0).astype(jnp.int32)
    w0 = jnp.where(valid, w0f, -2.0).astype(jnp.int32)

    # Four corners, stacked on a new axis: (00, 01, 10, 11).
    ch = jnp.stack([h0, h0, h0 + 1, h0 + 1], axis=-1)  # (B, Ho, Wo, K, 4)
    cw = jnp.stack([w0, w0 + 1, w0, w0 + 1], axis=-1)
    cwt = jnp.stack([(1 - lh) * (1 - lw), (1 - lh) * lw, lh * (1 - lw), lh * lw], axis=-1)
    inside = (ch >= 0) & (ch <= h_in - 1) & (cw >= 0) & (cw <= w_in - 1) & valid[..., None]
    cwt = jnp.where(inside, cwt, 0.0)
    flat_idx = jnp.clip(ch, 0, h_in - 1) * w_in + jnp.clip(cw, 0, w_in - 1)  # (B, Ho, Wo, K, 4)

    x_flat = x.reshape(b, h_in * w_in, cin)
    # One gather per batch element for all pixels, taps and corners: (B, Ho, Wo, K, 4, Cin).
    gathered = jax.vmap(lambda xf, idx: jnp.take(xf, idx, axis=0, mode="clip"))(x_flat, flat_idx)
    sampled = jnp.sum(cwt[..., None] * gathered, axis=-2)  # (B, Ho, Wo, K, Cin), exact fp32 weighted sum
    out = jnp.einsum(
        "bhwkc,kcd->bhwd",
        sampled,
        kernel.reshape(ntap, cin, cout),
        precision=jax.lax.Precision.HIGHEST,
    )
    if bias is not None:
        out = out + jnp.asarray(bias, jnp.float32)
    return out
