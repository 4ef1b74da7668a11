"""Pure-PyTorch deformable convolution (DCNv1, one deformable group), test reference only.

Semantics follow the mmcv / LIT ``mm_modules/DCN`` CUDA kernel (parity spec section 12, "DeformConv2dPack"):

* offset channel ``2*(i*kw + j)`` is the row offset ``dy`` and channel ``2*(i*kw + j) + 1`` the column offset
  ``dx`` of kernel tap ``(i, j)``;
* tap ``(i, j)`` of output ``(ho, wo)`` samples the input at
  ``(ho*stride - pad + i + dy, wo*stride - pad + j + dx)``;
* the sample is 0 unless ``-1 < h < H`` and ``-1 < w < W``; otherwise it is bilinear from the four surrounding
  pixels, a corner that lies outside the map contributing 0;
* ``out = bias + sum_{c, i, j} W[o, c, i, j] * sample[c, i, j]``.

Everything is computed in float32 with vectorised ``torch.gather`` (no torchvision, no CUDA).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

IntPair = Union[int, Tuple[int, int]]

__all__ = ["deform_conv2d_torch", "DeformConv2dPack", "perturb_offsets_"]


def _pair(v: IntPair) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        assert len(v) == 2
        return int(v[0]), int(v[1])
    return int(v), int(v)


def deform_conv2d_torch(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> torch.Tensor:
    """Deformable convolution v1 (1 group, 1 deformable group, dilation 1), computed in float32.

    Args:
      x: (B, Ci, H, W) input.
      offset: (B, 2*kh*kw, Ho, Wo) offsets, (dy, dx) interleaved per tap (row-major taps).
      weight: (Co, Ci, kh, kw).
      bias: (Co,) or None.
      stride, padding: int or (h, w) pair.
    Returns:
      (B, Co, Ho, Wo) float32.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    x = x.float()
    offset = offset.float()
    weight = weight.float()
    B, Ci, H, W = x.shape
    Co, Ci_w, kh, kw = weight.shape
    if Ci_w != Ci:
        raise ValueError(f"weight expects {Ci_w} input channels, x has {Ci}")
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    K = kh * kw
    if tuple(offset.shape) != (B, 2 * K, Ho, Wo):
        raise ValueError(f"offset shape {tuple(offset.shape)} != {(B, 2 * K, Ho, Wo)}")

    dev = x.device
    off = offset.view(B, K, 2, Ho, Wo)
    dy = off[:, :, 0]  # (B, K, Ho, Wo)
    dx = off[:, :, 1]
    tap_i = torch.arange(kh, device=dev).repeat_interleave(kw)  # tap k = i*kw + j
    tap_j = torch.arange(kw, device=dev).repeat(kh)
    base_y = (torch.arange(Ho, device=dev) * sh - ph).view(1, 1, Ho, 1) + tap_i.view(1, K, 1, 1)
    base_x = (torch.arange(Wo, device=dev) * sw - pw).view(1, 1, 1, Wo) + tap_j.view(1, K, 1, 1)
    py = base_y.to(torch.float32) + dy  # (B, K, Ho, Wo)
    px = base_x.to(torch.float32) + dx

    inside = (py > -1) & (py < H) & (px > -1) & (px < W)
    y0f = torch.floor(py)
    x0f = torch.floor(px)
    ly = py - y0f
    lx = px - x0f
    hy = 1.0 - ly
    hx = 1.0 - lx
    y0 = y0f.long()
    x0 = x0f.long()
    y1 = y0 + 1
    x1 = x0 + 1

    x_flat = x.reshape(B, Ci, H * W)
    cols = x.new_zeros((B, Ci, K, Ho, Wo))
    for yy, xx, wgt in ((y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)):
        ok = inside & (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
        idx = yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)  # (B, K, Ho, Wo)
        idx = idx.view(B, 1, K * Ho * Wo).expand(B, Ci, K * Ho * Wo)
        vals = torch.gather(x_flat, 2, idx).view(B, Ci, K, Ho, Wo)
        coef = torch.where(ok, wgt, torch.zeros_like(wgt))
        cols = cols + vals * coef.unsqueeze(1)

    out = torch.einsum("bckhw,ock->bohw", cols, weight.reshape(Co, Ci, K))
    if bias is not None:
        out = out + bias.float().view(1, Co, 1, 1)
    return out


class DeformConv2dPack(nn.Module):
    """DCNv1 whose offsets come from its own (zero-initialised) ``conv_offset`` conv.

    state_dict: ``weight (Co, Ci, kh, kw)``, ``bias (Co)``, ``conv_offset.weight (2*kh*kw, Ci, kh, kw)``,
    ``conv_offset.bias (2*kh*kw)``. ``forward`` returns only the output tensor (the original returns a tuple
    ``(out, offset_or_None)``); use ``forward_with_offset`` to get the offsets too.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair = 2, stride: IntPair = 2,
                 padding: IntPair = 0, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.conv_offset = nn.Conv2d(in_channels, 2 * kh * kw, self.kernel_size, self.stride, self.padding,
                                     bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same as the original wrapper: kaiming-uniform(a=sqrt 5) weight, U(+-1/sqrt(fan_in)) bias, zero offsets.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward_with_offset(self, x: torch.Tensor):
        offset = self.conv_offset(x)
        out = deform_conv2d_torch(x, offset, self.weight, self.bias, self.stride, self.padding)
        return out, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_offset(x)[0]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


@torch.no_grad()
def perturb_offsets_(model: nn.Module, scale: float = 1.0, seed: int = 0) -> nn.Module:
    """Fill every ``DeformConv2dPack.conv_offset`` with random values, in place.

    weight ~ N(0, scale^2 / fan_in) and bias ~ N(0, scale^2), so that for unit-variance inputs the offsets are
    roughly ``scale`` pixels (std), fractional, and some leave the feature map. Deterministic given ``seed``
    (modules are visited in ``named_modules`` order). Returns ``model``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    for _, m in model.named_modules():
        if isinstance(m, DeformConv2dPack):
            conv = m.conv_offset
            fan_in = conv.weight[0].numel()
            w = torch.randn(conv.weight.shape, generator=gen) * (scale / math.sqrt(fan_in))
            b = torch.randn(conv.bias.shape, generator=gen) * scale
            conv.weight.copy_(w.to(conv.weight))
            conv.bias.copy_(b.to(conv.bias))
    return model
