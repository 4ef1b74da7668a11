"""The LIT backbones (Pan et al., "Less is More: Pay Less Attention in Vision Transformers", AAAI 2022).

Both backbones take NHWC float images ``(B, H, W, 3)`` (already normalised) and return the four stage feature
maps, NHWC, at strides 4/8/16/32. They reproduce the detection-time behaviour of the original PyTorch code
(``shared/parity_spec.md`` §12):

* :class:`LITTi` (PVT-style): patch embedding 4x4/4 + LayerNorm, deformable token merging (DTM) before stages
  2-4, learned absolute position embeddings per stage, bilinearly resized to the feature size, MLP-only
  blocks in stages 1-2 and global attention blocks in stages 3-4. No output norms.
* :class:`LITS` (Swin-style widths): patch embedding + LayerNorm, MLP-only stages 1-2, global attention with a
  relative-position-bias table resized bicubically to the feature size in stages 3-4, DTM after stages 1-3,
  output LayerNorms on stages 2-4 only (stage 1's output is raw).

Variable names mirror the original ``state_dict`` (``patch_embed1``, ``block3_2``, ``layers_2/blocks_0``, ...).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.models.layers import (DeformableTokenMerging, MLPBlock, TransformerBlock, maybe_remat,
                                   resolve_remat_policy)
from lit_jax.ops.interpolate import resize_bilinear

Dtype = Any

# LIT-Ti's stage-1 token count at its 224x224 training size. The original skips the position-embedding resize
# whenever a stage's H*W equals this number (it compares every stage against the stage-1 count).
_TI_POS_SKIP_TOKENS = 56 * 56


def _drop_path_rates(depths: Sequence[int], rate: float) -> list[float]:
    """Linear stochastic-depth rates over all blocks (MLP blocks included), as ``torch.linspace``."""
    return [float(r) for r in np.linspace(0.0, rate, sum(depths))]


class PatchEmbed(nn.Module):
    """4x4/4 conv (VALID) + LayerNorm. ``(B, H, W, 3) -> (B, H/4, W/4, C)``."""

    features: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (4, 4), strides=(4, 4), padding="VALID", dtype=self.dtype, name="proj")(x)
        return nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)


def _freeze(x, stage: int, frozen_stages: int):
    """Stops gradients at the output of a frozen part: ``stage`` 0 is the patch embedding, 1..4 the stages.

    mmdet's convention (Swin's ``_freeze_stages``): ``frozen_stages = k >= 0`` freezes the patch embedding and
    stages ``1..k``. A frozen part also runs its BatchNorm and drop path in eval mode. The optimizer should mask
    frozen parameters from weight decay too (stopping the gradient alone leaves AdamW's decay on them).
    """
    return jax.lax.stop_gradient(x) if stage <= frozen_stages else x


class LITTi(nn.Module):
    """LIT-Ti backbone, detection variant.

    Attributes:
      embed_dims, depths, num_heads, mlp_ratios: the architecture (defaults: LIT-Ti).
      pos_grid: side of each stage's learned position-embedding grid (224/4, /8, /16, /32).
      drop_path_rate: stochastic depth, linear over all 16 blocks (the original hard-codes 0.1).
      use_checkpoint: rematerialise each block in the backward pass (the original's flag; ``remat_policy``
        'full').
      frozen_stages: ``k >= 0`` freezes the patch embedding (with ``pos_embed1``) and stages ``1..k`` (a stage
        here includes its DTM and position embedding): no gradient, BatchNorm and drop path in eval mode. -1
        (default) freezes nothing, as the original actually trains (LIT-Ti ignores the config's value).
      bn_group_size: images per BatchNorm statistics group in training (None: whole batch).
      dtype: compute dtype (parameters stay float32; the deformable sampling runs in float32).

    Performance switches (none changes the model; docs/benchmarks.md "Performance harness" has the measurements):
      attention_impl: ``'einsum'`` (default) | ``'dot_product'`` (``jax.nn.dot_product_attention``) | ``'cudnn'``
        (the same, forced to cuDNN: GPU with bf16/fp16 only); see :class:`lit_jax.models.layers.GlobalAttention`.
      attention_query_chunk: einsum attention over chunks of this many queries (0: none; None: auto, 128 on CPU).
      rel_bias_impl: LIT-S only: ``'fused'`` (default, bias lookup from iota indices fused into the logits) |
        ``'gather'`` (a constant ``(N, N)`` index per block, the bias materialised).
      dcn_impl: deformable sampling in the DTMs: ``'padded'`` (default) | ``'masked'`` (previous formulation).
      remat_policy: ``None`` (from ``use_checkpoint``) | ``'none'`` | ``'full'`` | ``'dots_saveable'`` |
        ``'dots_with_no_batch_dims_saveable'`` (:data:`lit_jax.models.layers.REMAT_POLICIES`).
      mlp_token_chunk: each block's LayerNorm + MLP over chunks of this many tokens (0: none; None: auto, 1024 on
        CPU, where it keeps the hidden activation in cache); see :func:`lit_jax.models.layers.norm_then_mlp`.
    """

    embed_dims: Sequence[int] = (64, 128, 320, 512)
    depths: Sequence[int] = (3, 4, 6, 3)
    num_heads: Sequence[int] = (1, 2, 5, 8)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    has_msa: Sequence[bool] = (False, False, True, True)
    pos_grid: Sequence[int] = (56, 28, 14, 7)
    drop_path_rate: float = 0.1
    use_checkpoint: bool = False
    frozen_stages: int = -1
    bn_group_size: Optional[int] = None
    attention_impl: str = "einsum"
    attention_query_chunk: Optional[int] = None
    rel_bias_impl: str = "fused"
    dcn_impl: str = "padded"
    remat_policy: Optional[str] = None
    mlp_token_chunk: Optional[int] = None
    dtype: Dtype = jnp.float32

    def _add_pos_embed(self, x, stage: int):
        """x: ``(B, H, W, C)``; adds the stage's position embedding, resized as the original does."""
        b, h, w, c = x.shape
        n_src = self.pos_grid[stage] ** 2
        # pos_embed4 keeps the classifier's class-token slot in front; the detection model drops it.
        n_stored = n_src + (1 if stage == 3 else 0)
        pos = self.param(
            f"pos_embed{stage + 1}", nn.initializers.truncated_normal(stddev=0.02), (1, n_stored, c)
        )
        pos = pos[:, n_stored - n_src :]
        if h * w == _TI_POS_SKIP_TOKENS and n_src == _TI_POS_SKIP_TOKENS:
            # The original adds the stored embedding untouched, reading it in row-major order for any H x W
            # with H*W == 3136 (e.g. 28x112 too).
            grid = pos.reshape(1, h, w, c)
        else:
            # Where the original compares a later stage against 3136 and then fails on the shape mismatch,
            # we resize (the only sensible behaviour); see docs/conversion.md.
            g = self.pos_grid[stage]
            grid = resize_bilinear(pos.reshape(1, g, g, c), (h, w))
        return x + grid.astype(x.dtype)

    def frozen_parameters(self) -> tuple:
        """Parameter names (prefixes under this module) that ``frozen_stages`` stops gradients to: the patch
        embedding with ``pos_embed1`` and, for each frozen stage ``s``, its blocks and (``s >= 2``) its token merging
        and position embedding. The optimizer leaves them untouched (weight decay included)."""
        if self.frozen_stages < 0:
            return ()
        names = ["patch_embed1/", "pos_embed1"]
        for s in range(1, min(self.frozen_stages, 4) + 1):
            names.append(f"block{s}_")
            if s >= 2:
                names += [f"patch_embed{s}/", f"pos_embed{s}"]
        return tuple(names)

    @nn.compact
    def __call__(self, images, train: bool = False):
        """images: ``(B, H, W, 3)`` -> list of 4 maps ``(B, H/4·2^-i, W/4·2^-i, embed_dims[i])`` (floor)."""
        dpr = _drop_path_rates(self.depths, self.drop_path_rate)
        policy = resolve_remat_policy(self.remat_policy, self.use_checkpoint)
        mlp_block = maybe_remat(MLPBlock, policy, static_argnums=(2,))
        attn_block = maybe_remat(TransformerBlock, policy, static_argnums=(2, 3))
        x = images.astype(self.dtype)
        outs = []
        block_id = 0
        for stage in range(4):
            stage_train = train and stage + 1 > self.frozen_stages
            dim = self.embed_dims[stage]
            if stage == 0:
                x = PatchEmbed(dim, norm_eps=1e-5, dtype=self.dtype, name="patch_embed1")(x)
                x = _freeze(self._add_pos_embed(x, stage), 0, self.frozen_stages)
            else:
                x = DeformableTokenMerging(
                    dim, bn_group_size=self.bn_group_size, dcn_impl=self.dcn_impl, dtype=self.dtype,
                    name=f"patch_embed{stage + 1}",
                )(x, train=stage_train)
                x = self._add_pos_embed(x, stage)
            b, h, w, c = x.shape
            tokens = x.reshape(b, h * w, c)
            for i in range(self.depths[stage]):
                name = f"block{stage + 1}_{i}"
                if self.has_msa[stage]:
                    blk = attn_block(
                        self.num_heads[stage], self.mlp_ratios[stage], dpr[block_id], norm_eps=1e-6,
                        attention_impl=self.attention_impl, query_chunk=self.attention_query_chunk,
                        token_chunk=self.mlp_token_chunk, dtype=self.dtype, name=name,
                    )
                    tokens = blk(tokens, (h, w), stage_train)
                else:
                    blk = mlp_block(self.mlp_ratios[stage], dpr[block_id], norm_eps=1e-6,
                                    token_chunk=self.mlp_token_chunk, dtype=self.dtype, name=name)
                    tokens = blk(tokens, stage_train)
                block_id += 1
            x = _freeze(tokens.reshape(b, h, w, c), stage + 1, self.frozen_stages)
            outs.append(x)
        return outs


class LITSStage(nn.Module):
    """One LIT-S stage (``layers.i`` in the original): blocks, then the optional DTM downsample.

    Returns ``(tokens, merged)``: the stage's un-normed output map ``(B, H, W, C)`` and the downsampled map
    ``(B, H/2, W/2, 2C)`` (or None for the last stage). The downsample consumes the un-normed tokens.
    """

    depth: int
    num_heads: int
    mlp_ratio: float
    has_msa: bool
    table_size: int
    drop_path: Sequence[float]
    downsample: bool
    remat_policy: str = "none"
    bn_group_size: Optional[int] = None
    attention_impl: str = "einsum"
    attention_query_chunk: Optional[int] = None
    rel_bias_impl: str = "fused"
    dcn_impl: str = "padded"
    mlp_token_chunk: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, downsample_train: bool = False):
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        for i in range(self.depth):
            if self.has_msa:
                blk = maybe_remat(TransformerBlock, self.remat_policy, static_argnums=(2, 3))(
                    self.num_heads, self.mlp_ratio, self.drop_path[i], norm_eps=1e-5, bias_mode="relative",
                    table_size=self.table_size, attention_impl=self.attention_impl,
                    query_chunk=self.attention_query_chunk, rel_bias_impl=self.rel_bias_impl,
                    token_chunk=self.mlp_token_chunk, dtype=self.dtype, name=f"blocks_{i}",
                )
                tokens = blk(tokens, (h, w), train)
            else:
                blk = maybe_remat(MLPBlock, self.remat_policy, static_argnums=(2,))(
                    self.mlp_ratio, self.drop_path[i], norm_eps=1e-5, token_chunk=self.mlp_token_chunk,
                    dtype=self.dtype, name=f"blocks_{i}"
                )
                tokens = blk(tokens, train)
        out = tokens.reshape(b, h, w, c)
        merged = None
        if self.downsample:
            merged = DeformableTokenMerging(
                2 * c, bn_group_size=self.bn_group_size, dcn_impl=self.dcn_impl, dtype=self.dtype, name="downsample"
            )(out, train=downsample_train)
        return out, merged


class LITS(nn.Module):
    """LIT-S backbone, detection variant.

    Attributes:
      embed_dim, depths, num_heads, mlp_ratio, has_msa: the architecture (defaults: LIT-S).
      table_sizes: R per stage for the relative-position-bias tables, ``(2R-1)^2`` rows; the detection model
        uses 50 and 25 for stages 3 and 4 (99x99 and 49x49, i.e. 200/2^i), ImageNet's are 14 and 7.
      drop_path_rate: stochastic depth, linear over all 12 blocks (0.2 in the detection configs).
      use_checkpoint, frozen_stages, bn_group_size, dtype: as in :class:`LITTi`.
      attention_impl, attention_query_chunk, rel_bias_impl, dcn_impl, remat_policy, mlp_token_chunk: the
        performance switches of :class:`LITTi` (``rel_bias_impl`` applies to LIT-S only).
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    mlp_ratio: float = 4.0
    has_msa: Sequence[bool] = (False, False, True, True)
    table_sizes: Sequence[int] = (200, 100, 50, 25)
    drop_path_rate: float = 0.2
    use_checkpoint: bool = False
    frozen_stages: int = -1
    bn_group_size: Optional[int] = None
    attention_impl: str = "einsum"
    attention_query_chunk: Optional[int] = None
    rel_bias_impl: str = "fused"
    dcn_impl: str = "padded"
    remat_policy: Optional[str] = None
    mlp_token_chunk: Optional[int] = None
    dtype: Dtype = jnp.float32

    def frozen_parameters(self) -> tuple:
        """Parameter names (prefixes under this module) that ``frozen_stages`` stops gradients to: the patch
        embedding and, for each frozen stage ``s``, ``layers_{s-1}`` (its blocks and token merging). The
        optimizer leaves them untouched (weight decay included)."""
        if self.frozen_stages < 0:
            return ()
        return ("patch_embed/",) + tuple(f"layers_{s - 1}/" for s in range(1, min(self.frozen_stages, 4) + 1))

    @nn.compact
    def __call__(self, images, train: bool = False):
        """images: ``(B, H, W, 3)`` -> list of 4 maps at strides 4/8/16/32 with 96/192/384/768 channels."""
        dpr = _drop_path_rates(self.depths, self.drop_path_rate)
        x = images.astype(self.dtype)
        # The original zero-pads to a multiple of the patch size (a no-op on 32-padded detection inputs).
        pad_h, pad_w = (-x.shape[1]) % 4, (-x.shape[2]) % 4
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        x = PatchEmbed(self.embed_dim, norm_eps=1e-5, dtype=self.dtype, name="patch_embed")(x)
        x = _freeze(x, 0, self.frozen_stages)
        outs = []
        first = 0
        for stage in range(4):
            stage_train = train and stage + 1 > self.frozen_stages
            depth = self.depths[stage]
            out, merged = LITSStage(
                depth, self.num_heads[stage], self.mlp_ratio, self.has_msa[stage], self.table_sizes[stage],
                tuple(dpr[first : first + depth]), downsample=stage < 3,
                remat_policy=resolve_remat_policy(self.remat_policy, self.use_checkpoint),
                bn_group_size=self.bn_group_size, attention_impl=self.attention_impl,
                attention_query_chunk=self.attention_query_chunk, rel_bias_impl=self.rel_bias_impl,
                dcn_impl=self.dcn_impl, mlp_token_chunk=self.mlp_token_chunk, dtype=self.dtype,
                name=f"layers_{stage}",
            )(x, train=stage_train, downsample_train=stage_train)
            first += depth
            out = _freeze(out, stage + 1, self.frozen_stages)
            if stage > 0:  # stage 1's output is raw in the original; norm1..3 follow stages 2..4
                out = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=f"norm{stage}")(out)
            outs.append(out)
            if merged is not None:
                x = _freeze(merged, stage + 1, self.frozen_stages)
        return outs
