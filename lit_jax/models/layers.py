"""Building blocks shared by the LIT backbones.

Every block here reproduces the PyTorch original's arithmetic (ziplab/LIT, detection branch) so converted
weights give the same numbers; see ``shared/parity_spec.md`` §12 and §14. Layout conventions:

* token sequences are ``(B, N, C)`` with tokens in row-major (y, x) order, as ``x.flatten(2).transpose(1, 2)``
  gives them in PyTorch;
* feature maps are NHWC ``(B, H, W, C)``;
* parameters are float32; ``dtype`` is the compute dtype.

Submodule and parameter names follow the original ``state_dict`` keys (``mlp.fc1``, ``attn.qkv``, ``norm2``,
``dconv.conv_offset``, ``norm_layer``, ...) so that the converter maps a key to a Flax path mechanically:
``block1.0.mlp.fc1.weight`` -> ``params/block1_0/mlp/fc1/kernel``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lit_jax.ops.deform_conv import deform_conv2d

Dtype = Any

# PyTorch's nn.GELU() is the exact erf form; flax/jax default to the tanh approximation.
gelu = functools.partial(jax.nn.gelu, approximate=False)

# torch.nn.Linear / nn.Conv2d initialisation is irrelevant for parity (weights are converted), but training
# from scratch follows the original's timm init for Linear layers: trunc_normal(0.02), zero bias.
dense_init = nn.initializers.truncated_normal(stddev=0.02)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm ``Mlp`` with dropout 0). Input and output ``(..., C)``."""

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        out_dim = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
        x = gelu(x)
        return nn.Dense(out_dim, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``): drops the residual branch and scales by 1/keep.

    Uses the ``'dropout'`` RNG stream; a no-op when ``deterministic`` or ``rate == 0``.
    """

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, mask_shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


# Tokens per chunk of each block's LayerNorm + MLP on CPU when ``token_chunk`` is None (auto). The MLP's hidden
# activation (tokens x 4-8 C floats: 124 MB per LIT-Ti stage-1 block at 800x1216) otherwise makes two round trips
# through memory around the exact GELU; a chunk of 1024 tokens keeps it in cache. Measured on 2 cores
# (docs/benchmarks.md, "End to end inference"): 256 / 512 / 1024 / 2048 / 4096, 1024 fastest for stages 1-2.
CPU_TOKEN_CHUNK = 1024


def resolve_token_chunk(token_chunk: Optional[int]) -> int:
    """``None`` (auto): :data:`CPU_TOKEN_CHUNK` when tracing for CPU, else 0 (all tokens at once)."""
    return _cpu_default(token_chunk, CPU_TOKEN_CHUNK)


def _cpu_default(value: Optional[int], cpu_value: int) -> int:
    """A chunk size switch: ``value``, or for None ``cpu_value`` when tracing for CPU and 0 elsewhere."""
    if value is None:
        return cpu_value if jax.default_backend() == "cpu" else 0
    if int(value) < 0:
        raise ValueError(f"a chunk size (attention_query_chunk / mlp_token_chunk) must be >= 0 (0: no chunks), "
                         f"got {value}")
    return int(value)


def map_token_chunks(fn: Callable, x, chunk: int):
    """``fn`` (a per-token function ``(T, C) -> (T, C')``) on ``(B, N, C)`` tokens, ``chunk`` tokens per
    ``lax.map`` step over the flattened ``B*N`` tokens (the last chunk zero-padded) -> ``(B, N, C')``.

    Per-token arithmetic is unchanged, so the result equals ``fn`` on all tokens at once up to float rounding
    (XLA may fuse the chunk differently: <= 5e-7 apart on LIT-Ti's stage outputs)."""
    b, n, c = x.shape
    flat = x.reshape(b * n, c)
    chunks = -(-(b * n) // chunk)
    padded = jnp.pad(flat, ((0, chunks * chunk - b * n), (0, 0))).reshape(chunks, chunk, c)
    out = jax.lax.map(fn, padded)
    return out.reshape(chunks * chunk, -1)[: b * n].reshape(b, n, -1)


def norm_then_mlp(block: nn.Module, norm: nn.Module, mlp: nn.Module, x, token_chunk: Optional[int]):
    """``mlp(norm(x))`` for a block's (declared, not yet called) ``norm`` and ``mlp`` submodules, over token chunks
    (:func:`resolve_token_chunk`) when there are more tokens than one chunk.

    The chunked path applies the two submodules' own definitions to the block's parameters inside ``lax.map``
    (a Flax submodule cannot be called inside a raw JAX transform); parameter names do not change."""
    chunk = resolve_token_chunk(token_chunk)
    b, n, _ = x.shape
    if not chunk or b * n <= chunk or block.is_initializing():
        return mlp(norm(x))
    params = block.variables["params"]
    norm_def, mlp_def = norm.clone(parent=None), mlp.clone(parent=None)
    norm_vars, mlp_vars = {"params": params[norm.name]}, {"params": params[mlp.name]}
    return map_token_chunks(lambda t: mlp_def.apply(mlp_vars, norm_def.apply(norm_vars, t)), x, chunk)


class MLPBlock(nn.Module):
    """LIT's attention-free block (stages 1-2): ``x + drop_path(mlp(norm2(x)))``. There is no norm1.

    ``token_chunk``: tokens per chunk of ``mlp(norm2(x))`` (:func:`norm_then_mlp`; None: auto, 1024 on CPU)."""

    mlp_ratio: float
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    token_chunk: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: ``(B, N, C)`` tokens -> ``(B, N, C)``."""
        c = x.shape[-1]
        norm = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm2")
        mlp = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")
        y = norm_then_mlp(self, norm, mlp, x, self.token_chunk)
        return x + DropPath(self.drop_path, name="drop_path")(y, deterministic=not train)


ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn")
REL_BIAS_IMPLS = ("fused", "gather")

# Queries per chunk of the einsum attention on CPU when ``query_chunk`` is None (auto). Measured on 2 cores at
# 800x1344 (docs/benchmarks.md, "Performance harness"): 128 keeps a chunk's logits (heads x 128 x N floats) in
# cache and was fastest of 64/128/256/512 for both LIT-Ti and LIT-S stage-3 attention.
CPU_QUERY_CHUNK = 128


def resolve_query_chunk(query_chunk: Optional[int]) -> int:
    """``None`` (auto): :data:`CPU_QUERY_CHUNK` when tracing for CPU, else 0 (all queries at once)."""
    return _cpu_default(query_chunk, CPU_QUERY_CHUNK)


class GlobalAttention(nn.Module):
    """Global multi-head self-attention with a fused ``qkv`` projection.

    ``bias_mode='none'`` is LIT-Ti's (PVT-style) attention: ``softmax((q @ k^T) * hd^-0.5) @ v``.
    ``bias_mode='relative'`` is LIT-S's: ``softmax((q * hd^-0.5) @ k^T + B) @ v``, where B comes from a learned
    ``relative_position_bias_table`` of shape ``((2R-1)^2, heads)`` that is bicubically resized at every call to
    the ``(2H-1, 2W-1)`` offsets of the current ``H x W`` token grid (see :func:`relative_position_bias`).

    Attributes:
      impl: ``'einsum'`` (default): head-major einsums ``(B, heads, N, hd)`` with the softmax in float32, optionally
        over chunks of queries; ``'dot_product'``: ``jax.nn.dot_product_attention`` (``implementation=None``: XLA
        picks, the XLA path on CPU); ``'cudnn'``: the same with ``implementation='cudnn'`` (GPU only, fp16/bf16).
        The dot_product paths scale the logits after ``q @ k^T`` (LIT-S's original scales q first): float32
        round-off only.
      query_chunk: einsum only: queries per chunk (``lax.map`` over chunks, the last one zero-padded); each chunk's
        softmax is the same row-wise computation, so the values equal the unchunked ones. 0: no chunking; None:
        auto (:func:`resolve_query_chunk`: 128 on CPU, where it keeps the logits in cache; 0 elsewhere).
      rel_bias_impl: LIT-S's bias lookup. ``'fused'`` (default): the ``(2H-1)(2W-1)`` offset index of each
        (query, key) pair is computed from iotas, so XLA fuses the table lookup into the logits (no ``(N, N)``
        index constant, no materialised ``(heads, N, N)`` bias outside ``'dot_product'``). ``'gather'``: the
        previous formulation: a numpy ``(N, N)`` index constant per block (70 MB at 800x1344's stage 3) and a
        materialised ``(heads, N, N)`` bias. Both read the same table entries: identical values.
    """

    num_heads: int
    bias_mode: str = "none"  # 'none' | 'relative'
    table_size: int = 0  # R: the table covers offsets in [-(R-1), R-1] along each axis
    impl: str = "einsum"
    query_chunk: Optional[int] = None
    rel_bias_impl: str = "fused"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, hw: tuple[int, int]):
        """x: ``(B, N, C)`` tokens of a row-major ``hw = (H, W)`` grid, ``N = H*W`` -> ``(B, N, C)``."""
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {self.impl!r}; known: {list(ATTENTION_IMPLS)}")
        if self.rel_bias_impl not in REL_BIAS_IMPLS:
            raise ValueError(f"unknown rel_bias_impl {self.rel_bias_impl!r}; known: {list(REL_BIAS_IMPLS)}")
        b, n, c = x.shape
        hd = c // self.num_heads
        scale = hd**-0.5
        qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=dense_init, name="qkv")(x)
        # (B, N, 3, heads, hd) as torch's reshape.
        qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
        bias_rows = None
        if self.bias_mode == "relative":
            side = 2 * self.table_size - 1
            table = self.param(
                "relative_position_bias_table",
                nn.initializers.truncated_normal(stddev=0.02),
                (side * side, self.num_heads),
            )
            bias_rows = _bias_rows_fn(table, self.table_size, hw, self.rel_bias_impl)
        elif self.bias_mode != "none":
            raise ValueError(f"unknown bias_mode {self.bias_mode!r}")
        if self.impl == "einsum":
            q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each (B, heads, N, hd)
            out = einsum_attention(q, k, v, scale, bias_rows=bias_rows, scale_queries=bias_rows is not None,
                                   query_chunk=resolve_query_chunk(self.query_chunk))
            out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, n, c)
        else:
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, N, heads, hd)
            bias = None if bias_rows is None else bias_rows(0, n)[None].astype(q.dtype)  # (1, heads, N, N)
            out = jax.nn.dot_product_attention(
                q, k, v, bias=bias, scale=scale, implementation="cudnn" if self.impl == "cudnn" else None
            ).reshape(b, n, c)
        return nn.Dense(c, dtype=self.dtype, kernel_init=dense_init, name="proj")(out)


def einsum_attention(q, k, v, scale: float, *, bias_rows=None, scale_queries: bool = False, query_chunk: int = 0):
    """Softmax attention over head-major arrays.

    Args:
      q, k, v: ``(B, heads, N, hd)``.
      scale: logit scale; applied to q before ``q @ k^T`` when ``scale_queries`` (LIT-S), else to the logits.
      bias_rows: None or ``f(start, rows) -> (heads, rows, N)`` float32: the additive bias of query rows
        ``start .. start + rows - 1`` (``start`` may be traced; rows past N may hold anything finite).
      query_chunk: queries per ``lax.map`` step (0, or >= N: one step). The last chunk is zero-padded.

    Returns:
      ``(B, heads, N, hd)`` in ``v.dtype``; the softmax runs in float32.
    """
    b, h, n, d = q.shape
    # A power-of-two scale (LIT-Ti: head dim 64, scale 1/8) gives the same bits on q as on the logits, and q is
    # the smaller array (5% of a LIT-Ti stage-3 attention on CPU).
    scale_queries = scale_queries or math.frexp(scale)[0] == 0.5

    def attend(qc, start):
        if scale_queries:
            logits = jnp.einsum("bhqd,bhkd->bhqk", qc * scale, k)
        else:
            logits = jnp.einsum("bhqd,bhkd->bhqk", qc, k) * scale
        if bias_rows is not None:
            logits = logits + bias_rows(start, qc.shape[2]).astype(logits.dtype)[None]
        # Softmax with the normalisation deferred past ``@ v``: ``(exp(l - max) @ v) / sum(exp(l - max))``. The
        # division then runs on the (chunk, hd) output instead of a pass over the (chunk, N) probabilities
        # (16% of a LIT-Ti stage-3 attention on CPU); the values differ from softmax-then-matmul by rounding only.
        logits = logits.astype(jnp.float32)
        unnormalised = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        total = jnp.sum(unnormalised, axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype), v)
        return (out.astype(jnp.float32) / total).astype(v.dtype)

    if not query_chunk or n <= query_chunk:
        return attend(q, 0)
    chunks = -(-n // query_chunk)
    padded = jnp.pad(q, ((0, 0), (0, 0), (0, chunks * query_chunk - n), (0, 0)))
    qs = jnp.moveaxis(padded.reshape(b, h, chunks, query_chunk, d), 2, 0)  # (chunks, B, heads, chunk, hd)
    out = jax.lax.map(lambda a: attend(a[1], a[0] * query_chunk), (jnp.arange(chunks), qs))
    return jnp.moveaxis(out, 0, 2).reshape(b, h, chunks * query_chunk, d)[:, :, :n]


def relative_position_index(hw: tuple[int, int]):
    """The original's gather index for an ``H x W`` grid: ``(N, N)`` int32, N = H*W.

    ``index[a, b] = (ha - hb + H - 1) * (2W - 1) + (wa - wb + W - 1)`` for row-major tokens a, b.
    Computed with numpy at trace time (static shapes).
    """
    import numpy as np

    h, w = hw
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + h - 1
    dx = xs[:, None] - xs[None, :] + w - 1
    return (dy * (2 * w - 1) + dx).astype(np.int32)


def resized_bias_table(table, table_size: int, hw: tuple[int, int]):
    """The table resized to the grid's offsets: ``((2R-1)^2, heads)`` -> ``(heads, (2H-1)*(2W-1))`` float32.

    Torch-compatible bicubic (A=-0.75, align_corners=False, clamped taps), as the original's ``F.interpolate``;
    entry ``r * (2W-1) + c`` holds offset ``(r - H + 1, c - W + 1)``.
    """
    from lit_jax.ops.interpolate import resize_bicubic

    side = 2 * table_size - 1
    h, w = hw
    grid = table.astype(jnp.float32).reshape(side, side, -1)
    grid = resize_bicubic(grid, (2 * h - 1, 2 * w - 1))
    return jnp.transpose(grid.reshape((2 * h - 1) * (2 * w - 1), -1))


def relative_position_bias_rows(flat, hw: tuple[int, int], start, rows: int):
    """Bias rows of queries ``start .. start + rows - 1``: ``(heads, rows, N)`` from ``flat`` ``(heads, M)``.

    The offset index :func:`relative_position_index` computed from iotas (``start`` may be traced), so under jit
    the lookup fuses into its consumer. Rows past N are clamped to valid entries (finite, meaningless).
    """
    h, w = hw
    n = h * w
    a = start + jax.lax.broadcasted_iota(jnp.int32, (rows, n), 0)  # query token
    k = jax.lax.broadcasted_iota(jnp.int32, (rows, n), 1)  # key token
    index = (a // w - k // w + h - 1) * (2 * w - 1) + (a % w - k % w + w - 1)
    return jnp.take(flat, index, axis=1, mode="clip")


def relative_position_bias(table, table_size: int, hw: tuple[int, int]):
    """LIT-S attention bias for the current grid (the ``'gather'`` formulation).

    Args:
      table: ``((2R-1)^2, heads)`` learned table; row ``r * (2R-1) + c`` holds offset ``(r - R + 1, c - R + 1)``.
      table_size: R.
      hw: the ``(H, W)`` token grid.
    Returns:
      ``(heads, N, N)`` float32 bias: the table viewed as ``(2R-1, 2R-1, heads)``, resized with torch-compatible
      bicubic (A=-0.75, align_corners=False, clamped taps) to ``(2H-1, 2W-1)``, gathered with
      :func:`relative_position_index`.
    """
    flat = resized_bias_table(table, table_size, hw)  # (heads, M)
    return flat[:, relative_position_index(hw)]


def _bias_rows_fn(table, table_size: int, hw: tuple[int, int], impl: str):
    """``f(start, rows) -> (heads, rows, N)`` float32 for :func:`einsum_attention`, per ``rel_bias_impl``."""
    if impl == "gather":
        full = relative_position_bias(table, table_size, hw)
        n = full.shape[-1]

        def rows_of_full(start, rows):
            if rows == n:
                return full
            padded = jnp.pad(full, ((0, 0), (0, rows), (0, 0)))  # the last chunk may run past N
            return jax.lax.dynamic_slice_in_dim(padded, start, rows, axis=1)

        return rows_of_full
    flat = resized_bias_table(table, table_size, hw)
    return lambda start, rows: relative_position_bias_rows(flat, hw, start, rows)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1 x)``, then ``x + mlp(norm2 x)`` (with drop path on both).

    ``attention_impl``, ``query_chunk``, ``rel_bias_impl``: :class:`GlobalAttention`'s ``impl``, ``query_chunk``,
    ``rel_bias_impl``; ``token_chunk``: as :class:`MLPBlock`'s.
    """

    num_heads: int
    mlp_ratio: float
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    bias_mode: str = "none"
    table_size: int = 0
    attention_impl: str = "einsum"
    query_chunk: Optional[int] = None
    rel_bias_impl: str = "fused"
    token_chunk: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, hw: tuple[int, int], train: bool = False):
        """x: ``(B, N, C)`` tokens of the row-major grid ``hw`` -> ``(B, N, C)``."""
        c = x.shape[-1]
        drop = DropPath(self.drop_path, name="drop_path")
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm1")(x)
        y = GlobalAttention(
            self.num_heads, self.bias_mode, self.table_size, impl=self.attention_impl, query_chunk=self.query_chunk,
            rel_bias_impl=self.rel_bias_impl, dtype=self.dtype, name="attn",
        )(y, hw)
        x = x + drop(y, deterministic=not train)
        norm = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm2")
        mlp = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")
        y = norm_then_mlp(self, norm, mlp, x, self.token_chunk)
        return x + drop(y, deterministic=not train)


class BatchNorm(nn.Module):
    """BatchNorm2d over NHWC maps with PyTorch semantics, and optional per-group batch statistics.

    * eval: ``(x - running_mean) / sqrt(running_var + eps) * scale + bias``;
    * train: normalises with the biased variance of the batch, and updates the running statistics with
      PyTorch's ``momentum`` (0.1: ``new = 0.9 * old + 0.1 * batch``) and the **unbiased** variance, as torch does;
    * ``group_size``: when set, statistics are computed over consecutive groups of that many images (the
      original normalises per GPU over its own 2 images); the running statistics are updated with the mean of
      the groups' statistics. ``None`` uses the whole batch (under ``jit`` with a sharded batch, that is the
      global batch).

    Variables: ``params/{scale,bias}``, ``batch_stats/{mean,var}`` (torch ``weight, bias, running_mean,
    running_var``).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    group_size: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x32 = x.astype(jnp.float32)
        if use_running_average:
            inv = jax.lax.rsqrt(running_var.value + self.epsilon)
            y = (x32 - running_mean.value) * inv * scale + bias
            return y.astype(self.dtype)
        b = x.shape[0]
        g = self.group_size or b
        if b % g:
            raise ValueError(f"BatchNorm: batch {b} is not a multiple of the statistics group size {g}")
        xg = x32.reshape((b // g, g) + x.shape[1:])
        axes = tuple(range(1, xg.ndim - 1))
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = (xg - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        if not self.is_initializing():
            count = g * x.shape[1] * x.shape[2]
            unbiased = var * (count / max(count - 1, 1))
            m = self.momentum
            running_mean.value = (1 - m) * running_mean.value + m * jnp.mean(mean, axis=(0,) + axes)
            running_var.value = (1 - m) * running_var.value + m * jnp.mean(unbiased, axis=(0,) + axes)
        return y.reshape(x.shape).astype(self.dtype)


class DeformConv(nn.Module):
    """DCNv1 (mmcv ``DeformConv2dPack``, one group): a plain conv predicts the offsets, then a deformable conv.

    Params: ``kernel (kh, kw, Cin, Cout)`` HWIO, ``bias (Cout,)``, and ``conv_offset/{kernel, bias}`` producing
    ``2*kh*kw`` channels laid out as (dy, dx) per tap ``i*kw + j``. The offset conv is zero-initialised, as in
    the original, so a fresh module is a plain strided conv. The deformable sampling runs in float32.
    """

    features: int
    kernel_size: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    impl: str = "padded"  # deform_conv2d's impl: 'padded' | 'masked'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: ``(B, H, W, Cin)`` -> ``(B, Ho, Wo, features)`` with ``Ho = (H - kh)//sh + 1`` (no padding)."""
        kh, kw = self.kernel_size
        cin = x.shape[-1]
        offsets = nn.Conv(
            2 * kh * kw,
            self.kernel_size,
            strides=self.stride,
            padding="VALID",
            kernel_init=nn.initializers.zeros,
            dtype=jnp.float32,
            name="conv_offset",
        )(x.astype(jnp.float32))
        kernel = self.param(
            "kernel", nn.initializers.kaiming_uniform(), (kh, kw, cin, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = deform_conv2d(x.astype(jnp.float32), offsets, kernel, bias, stride=self.stride, padding=(0, 0),
                          impl=self.impl)
        return y.astype(self.dtype)


class DeformableTokenMerging(nn.Module):
    """LIT's DTM: DeformConv 2x2/2 -> BatchNorm2d -> exact GELU. NHWC in, NHWC out at half resolution.

    ``dcn_impl``: :func:`lit_jax.ops.deform_conv2d`'s ``impl`` (``'padded'`` | ``'masked'``).
    """

    features: int
    bn_group_size: Optional[int] = None
    dcn_impl: str = "padded"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: ``(B, H, W, Cin)`` -> ``(B, (H-2)//2 + 1, (W-2)//2 + 1, features)``."""
        x = DeformConv(self.features, impl=self.dcn_impl, dtype=self.dtype, name="dconv")(x)
        x = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype, name="norm_layer")(
            x, use_running_average=not train
        )
        return gelu(x)


# Rematerialisation policies of the LIT blocks (``remat_policy``): what the backward pass keeps from the forward.
REMAT_POLICIES = {
    "none": None,  # no remat: everything the backward needs is stored
    "full": jax.checkpoint_policies.nothing_saveable,  # the original's use_checkpoint: recompute each block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep all matmul outputs (attention logits too)
    # keep the weight matmuls (qkv, proj, fc1, fc2), recompute the batched attention matmuls and the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve_remat_policy(remat_policy: Optional[str], use_checkpoint: bool) -> str:
    """The policy name in effect: ``remat_policy`` when given, else ``'full'`` / ``'none'`` from ``use_checkpoint``."""
    name = remat_policy if remat_policy is not None else ("full" if use_checkpoint else "none")
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; known: {sorted(REMAT_POLICIES)}")
    return name


def maybe_remat(block_cls: type[nn.Module], policy, static_argnums: tuple[int, ...]) -> Callable:
    """``block_cls`` wrapped in ``nn.remat`` with a :data:`REMAT_POLICIES` policy (or the block itself for 'none').

    ``policy``: a policy name, or a bool (the original's ``use_checkpoint``: True is ``'full'``).
    """
    name = resolve_remat_policy(None, policy) if isinstance(policy, bool) else resolve_remat_policy(policy, False)
    if name == "none":
        return block_cls
    return nn.remat(block_cls, static_argnums=static_argnums, policy=REMAT_POLICIES[name])
