"""PyTorch reference of the LIT-S backbone (detection and ImageNet variants), test reference only.

Written from the paper and shared/parity_spec.md section 12 ("LIT-S"):

* PatchEmbed: zero-pad H, W (bottom/right) to multiples of 4, conv4x4/s4 (3->96), LayerNorm;
* layers.0/1: 2 + 2 MLP blocks; layers.2/3: 6 + 2 global-MSA blocks with a relative position bias;
* downsample after layers 0-2: tokens -> NCHW -> DeformConv2dPack(C->2C, k2 s2) -> BatchNorm2d -> GELU -> tokens,
  applied to the un-normed tokens;
* all LayerNorms eps 1e-5, exact-erf GELU, drop path linear over the 12 blocks;
* detection outputs: stage 0 raw, stages 1-3 through norm1/norm2/norm3, all NCHW.

Relative position bias (every forward): the stored table ((2R-1)^2, heads) is viewed as (1, heads, 2R-1, 2R-1),
resized with F.interpolate(bicubic, align_corners=False) to (2H-1, 2W-1) and gathered with index
(ha-hb+H-1)*(2W-1) + (wa-wb+W-1) over row-major tokens a, b.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dcn import DeformConv2dPack
from .lit_ti import DropPath, Mlp

__all__ = ["LITSBackbone", "LITSDet", "LITSCls", "relative_position_index", "resize_rel_pos_table"]


def relative_position_index(H: int, W: int, device=None) -> torch.Tensor:
    """(H*W, H*W) int64: (ha-hb+H-1)*(2W-1) + (wa-wb+W-1) for row-major tokens a (rows) and b (columns)."""
    hh, ww = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    hh = hh.reshape(-1)
    ww = ww.reshape(-1)
    dh = hh[:, None] - hh[None, :] + (H - 1)
    dw = ww[:, None] - ww[None, :] + (W - 1)
    return (dh * (2 * W - 1) + dw).long()


def resize_rel_pos_table(table: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Table ((2R-1)^2, heads) -> (heads, 2H-1, 2W-1) via torch bicubic (A=-0.75, align_corners=False)."""
    L, nh = table.shape
    side = int(round(L ** 0.5))
    assert side * side == L, f"table length {L} is not a square"
    grid = table.permute(1, 0).reshape(1, nh, side, side)
    return F.interpolate(grid, size=(2 * H - 1, 2 * W - 1), mode="bicubic", align_corners=False)[0]


class RelPosAttention(nn.Module):
    """Global MSA with a resizable relative position bias: softmax((q*hd^-0.5) @ k^T + bias) @ v, then proj."""

    def __init__(self, dim: int, num_heads: int, table_res: int, qkv_bias: bool = True,
                 index_buffer_hw: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.table_res = table_res
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * table_res - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._index_hw = tuple(index_buffer_hw) if index_buffer_hw is not None else None
        if index_buffer_hw is not None:  # ImageNet checkpoints carry this (persistent) buffer
            self.register_buffer("relative_position_index", relative_position_index(*index_buffer_hw))
        else:
            self.relative_position_index = None

    def relative_position_bias(self, H: int, W: int) -> torch.Tensor:
        """(heads, H*W, H*W) bias for an H x W token grid."""
        table = resize_rel_pos_table(self.relative_position_bias_table, H, W).reshape(self.num_heads, -1)
        if self._index_hw == (H, W):
            idx = self.relative_position_index
        else:
            idx = relative_position_index(H, W, device=table.device)
        return table[:, idx.reshape(-1)].reshape(self.num_heads, H * W, H * W)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias(H, W).unsqueeze(0)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, table_res: int, mlp_ratio: float, drop_path: float,
                 index_buffer_hw: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = RelPosAttention(dim, num_heads, table_res, qkv_bias=True, index_buffer_hw=index_buffer_hw)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DeformablePatchMerging(nn.Module):
    """tokens (B, H*W, C) -> NCHW -> DCN(C->2C, k2 s2) -> BN2d -> GELU -> tokens (B, H/2*W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dconv = DeformConv2dPack(dim, 2 * dim, kernel_size=2, stride=2, padding=0, bias=True)
        self.norm_layer = nn.BatchNorm2d(2 * dim, eps=1e-5, momentum=0.1)
        self.act_layer = nn.GELU()

    def forward(self, x: torch.Tensor, H: int, W: int) -> Tuple[torch.Tensor, int, int]:
        B, L, C = x.shape
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        x = self.act_layer(self.norm_layer(self.dconv(x)))
        Hn, Wn = x.shape[2], x.shape[3]
        return x.flatten(2).transpose(1, 2), Hn, Wn


class LITLayer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, has_msa: bool, table_res: int, mlp_ratio: float,
                 drop_paths: Sequence[float], downsample: bool, index_buffer_hw: Optional[Tuple[int, int]] = None):
        super().__init__()
        if has_msa:
            blocks = [Block(dim, num_heads, table_res, mlp_ratio, drop_paths[i], index_buffer_hw)
                      for i in range(depth)]
        else:
            blocks = [MLPBlock(dim, mlp_ratio, drop_paths[i]) for i in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.downsample = DeformablePatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, H: int, W: int):
        for blk in self.blocks:
            x = blk(x, H, W)
        if self.downsample is not None:
            x_down, Hn, Wn = self.downsample(x, H, W)
            return x, H, W, x_down, Hn, Wn
        return x, H, W, x, H, W


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        p = self.patch_size
        H, W = x.shape[2], x.shape[3]
        if W % p:
            x = F.pad(x, (0, p - W % p))
        if H % p:
            x = F.pad(x, (0, 0, 0, p - H % p))
        x = self.proj(x)
        Hp, Wp = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), Hp, Wp


class LITSBackbone(nn.Module):
    embed_dim = 96
    depths = (2, 2, 6, 2)
    num_heads = (3, 6, 12, 24)
    has_msa = (False, False, True, True)
    mlp_ratio = 4.0

    def __init__(self, table_res: Sequence[int], drop_path_rate: float = 0.2,
                 index_buffers: Optional[Sequence[Optional[Tuple[int, int]]]] = None):
        super().__init__()
        self.num_features = [self.embed_dim * 2 ** i for i in range(4)]
        self.patch_embed = PatchEmbed(3, self.embed_dim, 4)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(self.depths))]
        self.layers = nn.ModuleList()
        for i in range(4):
            lo, hi = sum(self.depths[:i]), sum(self.depths[:i + 1])
            self.layers.append(LITLayer(
                dim=self.num_features[i], depth=self.depths[i], num_heads=self.num_heads[i],
                has_msa=self.has_msa[i], table_res=table_res[i], mlp_ratio=self.mlp_ratio,
                drop_paths=dpr[lo:hi], downsample=i < 3,
                index_buffer_hw=None if index_buffers is None else index_buffers[i]))

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RelPosAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def run_layers(self, x: torch.Tensor):
        """Yields (i, x_out tokens (un-normed), H, W) per layer; returns nothing."""
        x, Wh, Ww = self.patch_embed(x)
        for i, layer in enumerate(self.layers):
            x_out, H, W, x, Wh, Ww = layer(x, Wh, Ww)
            yield i, x_out, H, W


class LITSDet(LITSBackbone):
    """Detection backbone (mmdet ``LIT``): forward(x) -> [C2 raw, norm1(C3), norm2(C4), norm3(C5)] NCHW.

    Relative tables: R = 50 for layers.2 (9801, 12) and R = 25 for layers.3 (2401, 24).
    """

    def __init__(self, drop_path_rate: float = 0.2):
        super().__init__(table_res=(0, 0, 50, 25), drop_path_rate=drop_path_rate)
        for i in (1, 2, 3):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i], eps=1e-5))
        self._init_weights()

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for i, x_out, H, W in self.run_layers(x):
            if i != 0:
                x_out = getattr(self, f"norm{i}")(x_out)
            outs.append(x_out.reshape(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return outs


class LITSCls(LITSBackbone):
    """ImageNet LIT-S: tables R = 14 / 7 (729, 12) / (169, 24), ``relative_position_index`` buffers for the
    14x14 / 7x7 grids of a 224 input, final ``norm`` (768), token mean, ``head``."""

    def __init__(self, num_classes: int = 1000, drop_path_rate: float = 0.2):
        super().__init__(table_res=(0, 0, 14, 7), drop_path_rate=drop_path_rate,
                         index_buffers=(None, None, (14, 14), (7, 7)))
        self.norm = nn.LayerNorm(self.num_features[3], eps=1e-5)
        self.head = nn.Linear(self.num_features[3], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = None
        for i, x_out, H, W in self.run_layers(x):
            last = x_out
        return self.head(self.norm(last).mean(dim=1))
