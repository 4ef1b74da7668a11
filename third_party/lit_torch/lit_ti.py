"""PyTorch reference of the LIT-Ti backbone (detection and ImageNet variants), test reference only.

Written from the paper and shared/parity_spec.md section 12 ("LIT-Ti"):

* stage 1: conv4x4/s4 (3->64) -> row-major tokens -> LayerNorm(eps 1e-5) -> + pos1 -> 3 MLP blocks;
* stages 2-4: tokens -> NCHW -> DeformConv2dPack(k2, s2) -> BatchNorm2d -> GELU -> tokens -> + pos_k -> blocks
  (stage 2: 4 MLP blocks; stages 3, 4: 6 and 3 ViT blocks with global MSA);
* block LayerNorms eps 1e-6, exact-erf GELU, drop path linear over all 16 blocks;
* outputs: the four stage outputs as NCHW, no output norms.

Positional embeddings keep the original's quirk: at EVERY stage the stored embedding is used as-is when the
stage's token count equals 3136 (the stage-1 count at 224x224), otherwise it is bilinearly resized
(align_corners=False) from its square source grid. At stages 2-4 the "as-is" branch cannot work (the stored
embedding has a different length) and the original crashes; we raise a RuntimeError there.
"""
from __future__ import annotations

from functools import partial
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dcn import DeformConv2dPack

__all__ = ["LITTiBackbone", "LITTiDet", "LITTiCls", "DropPath", "Mlp", "drop_path"]

STAGE1_NUM_PATCHES = 3136  # 56 * 56: the count the original compares against at every stage


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample (timm semantics: keep with prob 1-p, scale kept samples by 1/(1-p))."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = torch.floor(keep + torch.rand(shape, dtype=x.dtype, device=x.device))
    return x.div(keep) * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTAttention(nn.Module):
    """Global multi-head self-attention: softmax((q @ k^T) * hd^-0.5) @ v, then proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class MLPBlock(nn.Module):
    """x + drop_path(mlp(norm2(x))); no attention, no norm1."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, norm_layer):
        super().__init__()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ViTAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Stage-1 patchify: conv4x4/s4 -> row-major tokens -> LayerNorm (plain nn.LayerNorm, eps 1e-5)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)
        H, W = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)


class DeformablePatchEmbed(nn.Module):
    """DTM: DeformConv2dPack(k2, s2, p0, bias) -> BatchNorm2d -> GELU -> row-major tokens."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.dconv = DeformConv2dPack(in_chans, embed_dim, kernel_size=2, stride=2, padding=0, bias=True)
        self.norm_layer = nn.BatchNorm2d(embed_dim, eps=1e-5, momentum=0.1)
        self.act_layer = nn.GELU()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.act_layer(self.norm_layer(self.dconv(x)))
        H, W = x.shape[2], x.shape[3]
        return x.flatten(2).transpose(1, 2), (H, W)


class LITTiBackbone(nn.Module):
    """Shared LIT-Ti trunk. ``forward_stages`` returns the four stage outputs (NCHW)."""

    embed_dims = (64, 128, 320, 512)
    depths = (3, 4, 6, 3)
    num_heads = (1, 2, 5, 8)
    mlp_ratios = (8, 8, 4, 4)
    pos_grids = (56, 28, 14, 7)  # square source grids of pos_embed1-4 (pos_embed4 has 1 + 7*7 rows)

    def __init__(self, drop_path_rate: float = 0.1, with_cls_token: bool = False):
        super().__init__()
        d = self.embed_dims
        self.with_cls_token = with_cls_token
        self.patch_embed1 = PatchEmbed(3, d[0], patch_size=4)
        self.patch_embed2 = DeformablePatchEmbed(d[0], d[1])
        self.patch_embed3 = DeformablePatchEmbed(d[1], d[2])
        self.patch_embed4 = DeformablePatchEmbed(d[2], d[3])
        g = self.pos_grids
        self.pos_embed1 = nn.Parameter(torch.zeros(1, g[0] * g[0], d[0]))
        self.pos_embed2 = nn.Parameter(torch.zeros(1, g[1] * g[1], d[1]))
        self.pos_embed3 = nn.Parameter(torch.zeros(1, g[2] * g[2], d[2]))
        self.pos_embed4 = nn.Parameter(torch.zeros(1, g[3] * g[3] + 1, d[3]))
        if with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d[3]))

        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(self.depths))]
        norm = partial(nn.LayerNorm, eps=1e-6)
        cur = 0
        blocks = []
        for s in range(4):
            if s < 2:
                mods = [MLPBlock(d[s], self.mlp_ratios[s], dpr[cur + i], norm) for i in range(self.depths[s])]
            else:
                mods = [ViTBlock(d[s], self.num_heads[s], self.mlp_ratios[s], dpr[cur + i], norm)
                        for i in range(self.depths[s])]
            blocks.append(nn.ModuleList(mods))
            cur += self.depths[s]
        self.block1, self.block2, self.block3, self.block4 = blocks

        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for p in (self.pos_embed1, self.pos_embed2, self.pos_embed3, self.pos_embed4):
            nn.init.trunc_normal_(p, std=0.02)
        if self.with_cls_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_pos_embed(self, stage: int, H: int, W: int) -> torch.Tensor:
        """Positional embedding (1, H*W, C) for ``stage`` in 1..4 (stage 4 without the cls slot).

        Reproduces the original rule: if H*W == 3136 the stored embedding is returned as-is (the same tensor
        object), at every stage; otherwise it is reshaped to its square source grid and resized with
        F.interpolate(bilinear, align_corners=False) to (H, W).
        """
        pos = getattr(self, f"pos_embed{stage}")
        if stage == 4:
            pos = pos[:, 1:]
        if H * W == STAGE1_NUM_PATCHES:
            if pos.shape[1] != H * W:
                raise RuntimeError(
                    f"LIT-Ti pos-embed quirk: stage {stage} has H*W == {STAGE1_NUM_PATCHES}, so the original adds "
                    f"pos_embed{stage} ({pos.shape[1]} rows) as-is and crashes")
            return pos
        g = self.pos_grids[stage - 1]
        C = pos.shape[-1]
        grid = pos.reshape(1, g, g, C).permute(0, 3, 1, 2)
        out = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
        return out.reshape(1, C, H * W).permute(0, 2, 1)

    def forward_stages(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Returns (outs, last_tokens); with a cls token, last_tokens includes it at index 0."""
        B = x.shape[0]
        outs: List[torch.Tensor] = []
        x, (H, W) = self.patch_embed1(x)
        x = x + self.get_pos_embed(1, H, W)
        for blk in self.block1:
            x = blk(x)
        x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        outs.append(x)
        for s in (2, 3, 4):
            x, (H, W) = getattr(self, f"patch_embed{s}")(x)
            pos = self.get_pos_embed(s, H, W)
            if s == 4 and self.with_cls_token:
                x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
                pos = torch.cat([self.pos_embed4[:, :1], pos], dim=1)
            x = x + pos
            for blk in getattr(self, f"block{s}"):
                x = blk(x)
            tokens = x
            if s == 4 and self.with_cls_token:
                x = x[:, 1:]
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs, tokens


class LITTiDet(LITTiBackbone):
    """Detection backbone (mmdet ``LIT_Ti``): forward(x (B,3,H,W)) -> [C2, C3, C4, C5] NCHW (64/128/320/512)."""

    def __init__(self, drop_path_rate: float = 0.1):
        super().__init__(drop_path_rate=drop_path_rate, with_cls_token=False)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_stages(x)[0]


class LITTiCls(LITTiBackbone):
    """ImageNet LIT-Ti: cls token before the stage-4 blocks, LayerNorm(eps 1e-6) on it, linear head -> logits."""

    def __init__(self, num_classes: int = 1000, drop_path_rate: float = 0.1):
        super().__init__(drop_path_rate=drop_path_rate, with_cls_token=True)
        self.norm = nn.LayerNorm(self.embed_dims[3], eps=1e-6)
        self.head = nn.Linear(self.embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, tokens = self.forward_stages(x)
        return self.head(self.norm(tokens)[:, 0])
