"""RoIAlign (mmcv 1.3 ``RoIAlign``, avg pooling) and mmdet 2.11's ``SingleRoIExtractor``, static shapes.

Layout: features are NHWC ``(B, H, W, C)``; rois are ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image
pixels; outputs are ``(R, oh, ow, C)`` (mmcv's ``(R, C, oh, ow)`` transposed to channels-last).

mmcv rules reproduced (``roi_align_forward_cuda_kernel``, ``pool_mode=1``; parity_spec.md §9, §14.10), float32:

* ``start = x1 * spatial_scale - offset`` (same for y1, x2, y2) with ``offset = 0.5`` when ``aligned`` else 0;
  ``roi_w = end_x - start_x`` (no minimum when aligned; ``max(roi_w, 1)`` when not aligned), same for h;
* ``bin_h = roi_h / oh``, ``bin_w = roi_w / ow``;
* samples per bin axis: ``sampling_ratio`` if ``> 0``, else the ADAPTIVE ``grid_h = ceil(roi_h / oh)``,
  ``grid_w = ceil(roi_w / ow)``; sample ``(iy, ix)`` of bin ``(ph, pw)`` is at
  ``y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h`` (this operation order), same for x;
* per sample point (mmcv ``bilinear_interpolate``): 0 if ``y < -1 or y > H or x < -1 or x > W``; else clamp
  ``y, x`` to ``>= 0``; ``y_low = floor(y)``; if ``y_low >= H - 1`` then ``y_low = y_high = H - 1`` and the row is
  used without interpolation, else ``y_high = y_low + 1`` (same for x); bilinear with weights
  ``(1 - ly)(1 - lx), (1 - ly) lx, ly (1 - lx), ly lx``;
* bin value = sum of the samples / ``max(grid_h * grid_w, 1)``; a roi with ``grid_h <= 0`` or ``grid_w <= 0``
  (inverted / empty aligned roi) gives 0;
* the batch index is truncated to int (``int roi_batch_ind = rois[n, 0]``); we also clip it to ``[0, B - 1]``.
* No gradient flows to ``rois`` (mmcv's backward returns None for them; mmdet detaches proposals anyway).
* Every division is a true IEEE division (:func:`_div`): XLA would otherwise multiply by the reciprocal, and
  ``ceil(42 * (1 / 14)) = 4`` is not mmcv's ``ceil(42 / 14) = 3`` (issue 12 item 7).

Static shapes, the masked max-grid
-----------------------------------
The adaptive grid is data dependent. We evaluate a static ``Gh x Gw`` (``max_samples``) grid per bin and mask the
samples with ``iy >= grid_h`` / ``ix >= grid_w``, so the result is EXACT (equal to mmcv up to fp32 rounding,
measured <= 1.3e-6 of max|out|) for every roi whose adaptive grid satisfies ``grid_h <= Gh`` and ``grid_w <= Gw``.
Above that the grid is CAPPED: the roi is sampled with ``min(grid_h, Gh) x min(grid_w, Gw)`` points per bin placed at
``(k + 0.5) / min(grid, G)`` of the bin, and the bin is their mean -- i.e. exactly mmcv with
``sampling_ratio = G`` on the capped axis. The capped value is a coarser quadrature of the same bin average; the
difference is small for smooth features and is measured in ``tests/ops/test_roi_align.py`` (huge box).

Defaults: ``roi_align`` uses ``Gh = min(ceil(H / oh), 16)``, ``Gw = min(ceil(W / ow), 16)``: exact for every roi
that lies inside the feature map (then ``roi_h <= H`` so ``grid_h <= ceil(H / oh)``) as long as the map is at most
``16 * out`` pixels along that axis. ``multilevel_roi_align`` uses, per axis,
``G = ceil(max(4 * finest_scale / strides[0], size of the coarsest level) / out)`` (8 for 7x7 and 4 for 14x14 with
mmdet's settings and images up to 1792 px): by the level rule a roi on level ``l < L-1`` has
``sqrt(w * h) < 2 * finest_scale / strides[0]`` (= 28) pixels of its level, so every such roi with aspect ratio
``<= 4`` is exact, and so is every roi on the coarsest level that lies inside the image. Pass ``max_samples``
explicitly for other trade-offs (cost is linear in ``Gh * Gw``).

Implementation: gathers in a loop over the sample grid, not a dense one-hot einsum
-----------------------------------------------------------------------------------
All levels (one for :func:`roi_align`) are flattened into one ``(B * sum_l H_l W_l, C)`` table. A loop over the
sample grid gathers, per step, the 4 corner ``C``-vectors of that sample in every bin of every roi (4 separate
``(R, oh, ow, C)`` gathers that XLA fuses with the weighted sum) and accumulates them. The trip count is the grid
the batch NEEDS, ``max(grid_h) * max(grid_w)``, not the static ``Gh * Gw``: a cap of 16 costs nothing unless a roi
uses it. (An earlier version looped over all ``Gh * Gw`` steps and skipped the unneeded ones with ``lax.cond``;
XLA:CPU copied the accumulator in every skipped step, 256 x 50 MB for 1000 rois at 7x7 with the test cap 16.)
Reverse mode goes through a custom VJP (a dynamic trip count is not reverse-differentiable): the transpose, the
same corners scatter-added (mmcv's CUDA backward does the same atomicAdds). Cost: ``4 * R * oh * ow * C`` reads per
step (R=1000, 7x7, C=256: 50 M floats), mostly cache hits since neighbouring samples share pixels; peak memory is one
step. The backward packs the (roi, sample) pairs that the rois USE into chunks of ``R`` (``backward='compact'``,
default): ``ceil(sum_r gh_r * gw_r / R)`` scatter steps, the mean grid instead of the largest one; looping over the
forward's ``max(gh) * max(gw)`` steps with every roi in every step (``'rows'``) scattered mostly zeros, since one
elongated or large roi sets the trip count for all (XLA:CPU's scatter-add costs ~10x the gather of the same rows,
so this was the dominant cost of the Mask R-CNN RoIAlign gradient; docs/benchmarks.md, issue 16 item 4). Scattering
one ``2 x 2 x C`` window per sample into a padded 2-D copy of the levels instead of four rows was measured no faster
on XLA:CPU and is not kept. The per-axis weights are built separably (``wy * wx``, equal to mmcv's ``hy * hx``
products since the validity masks are 0/1).

Rejected alternatives: (1) one gather over the whole ``(R, oh, Gh, 2, ow, Gw, 2, C)`` sample set and one reduction
(``_pool_vectorized``, kept for benchmarking): a single kernel if XLA fuses the gather into the reduction, but
XLA:CPU materialises it (12.8 GB temp for the case above) and we could not check XLA:GPU (no GPU for this task).
(2) A dense separable one-hot einsum ``A_y (R, oh, H) @ F[b] @ A_x (R, ow, W)^T``: exact in the same sense but
``R * oh * H * W * C`` MACs and an ``(R, oh, W, C)`` intermediate -- for P2 of an 800x1333 image (200x334),
R=1000, C=256: 1.2e11 MACs (~5 ms of fp32 at HIGHEST precision) and 2.4 GB per level, one to two orders of
magnitude more than the gathers (which read ``4 * 49 * Gh * Gw * 256`` floats per roi). Timings on GPU were not
measured here.

Multilevel (SingleRoIExtractor): all levels are flattened into one table and each roi's sample indices are
computed on its own level (per-roi stride, H, W and table offset), so every roi is pooled exactly once: cost and
memory are those of a single ``roi_align`` over R rois, independent of the number of levels (the "compute all
levels and select" alternative costs ``L`` times as much; masking per level still gathers for every level). The
only extra cost is the concatenation copy of the levels (``B * sum H_l W_l * C``).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["roi_align", "multilevel_roi_align", "map_roi_levels", "default_max_samples", "DEFAULT_MAX_SAMPLES_CAP",
           "FPN_STRIDES"]

IntPair = Union[int, Sequence[int]]

# Single-level default cap on the per-axis number of samples (see the module docstring).
DEFAULT_MAX_SAMPLES_CAP = 16
# mmdet SingleRoIExtractor featmap_strides for the Mask R-CNN RoI heads (P2-P5).
FPN_STRIDES = (4, 8, 16, 32)


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v), int(v))
    v = tuple(int(a) for a in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v}")
    return v  # type: ignore[return-value]


def default_max_samples(feature_hw: Sequence[int], output_size: IntPair,
                        cap: int = DEFAULT_MAX_SAMPLES_CAP) -> Tuple[int, int]:
    """Single-level default ``(Gh, Gw) = (min(ceil(H / oh), cap), min(ceil(W / ow), cap))``, at least 1."""
    oh, ow = _pair(output_size, "output_size")
    h, w = int(feature_hw[0]), int(feature_hw[1])
    return max(1, min(-(-h // oh), cap)), max(1, min(-(-w // ow), cap))


def _multilevel_default_max_samples(level_hw: Sequence[Tuple[int, int]], output_size: Tuple[int, int],
                                    strides: Sequence[int], finest_scale: float) -> Tuple[int, int]:
    """``G = ceil(max(4 * finest_scale / strides[0], coarsest level size) / out)`` per axis (module docstring)."""
    guard = 4.0 * float(finest_scale) / float(strides[0])
    h_top, w_top = level_hw[-1]
    gh = int(math.ceil(max(guard, h_top) / output_size[0]))
    gw = int(math.ceil(max(guard, w_top) / output_size[1]))
    return max(gh, 1), max(gw, 1)


def _div(a, b):
    """IEEE ``a / b`` as mmcv computes it: ``b`` is broadcast to ``a``'s shape behind an optimization barrier.

    XLA's algebraic simplifier rewrites ``x / broadcast(d)`` (a constant, or one value per roi spread over the
    sample grid) into ``x * broadcast(1 / d)``, which is off by up to an ulp: ``42 / 14`` becomes ``3.0000002``,
    and the ``ceil`` of the adaptive grid then jumps from 3 to 4 samples. A full-shape divisor it cannot see
    through keeps the true division (cheap here: every divisor is per roi or per sample axis, never per channel).
    """
    a = jnp.asarray(a)
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def map_roi_levels(rois, num_levels: int = 4, finest_scale: float = 56.0) -> jnp.ndarray:
    """mmdet 2.11 ``SingleRoIExtractor.map_roi_levels``: ``(R, 5)`` rois -> ``(R,)`` int32 level.

    ``level = clamp(floor(log2(sqrt(w * h) / finest_scale + 1e-6)), 0, num_levels - 1)`` in float32 (no ``+1``):
    with 56, level 0 below 112, 1 for [112, 224), 2 for [224, 448), 3 at 448 and above. A roi with ``w * h < 0``
    (inverted on one axis) has a NaN scale; mmdet's ``.long()`` of NaN (INT64_MIN on x86 and CUDA) matches no
    level and the roi keeps its zero-initialised features: we return -1 for it.
    """
    rois = jnp.asarray(rois, jnp.float32)
    scale = jnp.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    lvl = jnp.floor(jnp.log2(_div(scale, jnp.float32(finest_scale)) + jnp.float32(1e-6)))
    lvl = jnp.clip(lvl, 0.0, float(num_levels - 1))
    nan = jnp.isnan(lvl)
    return jnp.where(nan, -1, jnp.where(nan, 0.0, lvl).astype(jnp.int32))


def _axis_samples(start, bin_size, grid, size, n_out: int, g_max: int):
    """Sample corners and weights along one axis (mmcv ``bilinear_interpolate`` split per axis).

    Args (per roi, shape ``(R,)``): ``start`` / ``bin_size`` float32, ``grid`` int32 effective samples per bin
    (``<= g_max``; ``<= 0`` means no samples), ``size`` int32 length of the roi's level along this axis.

    Returns ``(lo, hi, w_lo, w_hi)``, each ``(R, n_out, g_max)``: corner indices in ``[0, size - 1]`` and weights,
    zero for masked samples (``k >= grid``) and for points outside ``[-1, size]``.
    """
    p = jnp.arange(n_out, dtype=jnp.float32)[None, :, None]
    k = jnp.arange(g_max, dtype=jnp.float32)[None, None, :]
    s = start[:, None, None]
    b = bin_size[:, None, None]
    gf = jnp.maximum(grid, 1).astype(jnp.float32)[:, None, None]
    # mmcv: roi_start + p * bin_size + (k + .5f) * bin_size / grid, evaluated left to right.
    pos = (s + p * b) + _div((k + jnp.float32(0.5)) * b, gf)
    sizef = size.astype(jnp.float32)[:, None, None]
    size_i = size[:, None, None]
    used = k < grid.astype(jnp.float32)[:, None, None]
    valid = used & (pos >= -1.0) & (pos <= sizef)  # NaN positions are invalid
    y = jnp.where(valid, jnp.maximum(pos, 0.0), 0.0)
    lo = jnp.floor(y).astype(jnp.int32)  # y in [0, size] here: the int cast is safe
    at_end = lo >= size_i - 1
    lo = jnp.where(at_end, size_i - 1, lo)
    hi = jnp.where(at_end, size_i - 1, lo + 1)
    y = jnp.where(at_end, lo.astype(jnp.float32), y)
    frac = y - lo.astype(jnp.float32)
    vf = valid.astype(jnp.float32)
    w_lo = (jnp.float32(1.0) - frac) * vf
    w_hi = frac * vf
    return lo, hi, w_lo, w_hi


def _pool(table, base, level_h, level_w, starts, bins, grids, out_hw: Tuple[int, int], g_max: Tuple[int, int],
          backward: str = "compact"):
    """Average-pool every roi from the flat ``(N, C)`` table: a loop over the sample grid the batch needs.

    ``base`` (R,) int32: table row of pixel (0, 0) of the roi's (batch, level); ``level_h/w`` (R,) int32;
    ``starts``/``bins`` = (y, x) float32 (R,) pairs; ``grids`` = (gh, gw) int32 (R,) effective sample counts.

    Step ``t`` of ``max(gh) * max(gw)`` (a data-dependent trip count; the static ``Gh x Gw`` only bounds it)
    gathers the 4 corners of sample ``(t // max(gw), t % max(gw))`` of every bin of every roi and adds
    ``w1 v1 + w2 v2 + w3 v3 + w4 v4`` to the accumulator (mmcv's order). Peak memory is one step's gathers;
    the backward (:func:`_gather_sum`'s custom VJP) is the transpose: scatter-adds of the same corners.
    ``backward='compact'`` (default) scatters only the samples each roi uses, packed into chunks of ``R``
    (roi, sample) pairs; ``'rows'`` (the earlier backward, kept for comparison) loops over the same
    ``max(gh) * max(gw)`` steps as the forward, every roi in every step (zero weights where a roi's own grid is
    smaller). Same sums, different addition order.
    """
    oh, ow = out_hw
    gh_max, gw_max = g_max
    ylo, yhi, wylo, wyhi = _axis_samples(starts[0], bins[0], grids[0], level_h, oh, gh_max)  # (R, oh, Gh)
    xlo, xhi, wxlo, wxhi = _axis_samples(starts[1], bins[1], grids[1], level_w, ow, gw_max)  # (R, ow, Gw)
    rows = base[:, None, None, None] + jnp.stack([ylo, yhi], -1) * level_w[:, None, None, None]  # (R, oh, Gh, 2)
    cols = jnp.stack([xlo, xhi], -1)  # (R, ow, Gw, 2)
    wy = jnp.stack([wylo, wyhi], -1)
    wx = jnp.stack([wxlo, wxhi], -1)
    need = jnp.stack([jnp.max(grids[0], initial=0), jnp.max(grids[1], initial=0)])
    if backward not in ("compact", "rows"):
        raise ValueError(f"backward must be 'compact' or 'rows', got {backward!r}")
    spec = (tuple(table.shape), jnp.dtype(table.dtype).name, backward)
    acc = _gather_sum(spec, table, rows, cols, wy, wx, need, grids[0], grids[1])
    count = jnp.maximum(grids[0] * grids[1], 1).astype(jnp.float32)
    return acc / count[:, None, None, None]


def _step_corners(rows, cols, wy, wx, need, t):
    """Sample ``t`` of every bin: 4 corner indices ``(R, oh, ow)`` and weights, in mmcv's order."""
    iy, ix = t // need[1], t % need[1]
    ry = jax.lax.dynamic_index_in_dim(rows, iy, axis=2, keepdims=False)  # (R, oh, 2)
    cx = jax.lax.dynamic_index_in_dim(cols, ix, axis=2, keepdims=False)  # (R, ow, 2)
    vy = jax.lax.dynamic_index_in_dim(wy, iy, axis=2, keepdims=False)
    vx = jax.lax.dynamic_index_in_dim(wx, ix, axis=2, keepdims=False)
    corners = [(a, b) for a in (0, 1) for b in (0, 1)]  # (y_low, x_low), (y_low, x_high), (y_high, ...)
    idx = [ry[:, :, None, a] + cx[:, None, :, b] for a, b in corners]
    w = [vy[:, :, None, a] * vx[:, None, :, b] for a, b in corners]  # hy*hx, hy*lx, ly*hx, ly*lx
    return idx, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_sum(spec, table, rows, cols, wy, wx, need, gh, gw):
    """``sum over samples t < need[0] * need[1]`` of the 4 weighted corners, ``(R, oh, ow, C)`` float32.

    Four separate ``(R, oh, ow, C)`` gathers per step (not one ``(..., 4, C)`` gather and a reduction), so that
    XLA fuses them with the weighted sum into one pass that writes only the accumulator. ``spec``: the table's
    static (shape, dtype name, backward mode), for the backward; ``gh`` / ``gw`` (R,) int32: each roi's own
    sample grid (the weights of samples beyond it are 0), used by the compact backward.
    """
    r, oh, ow = rows.shape[0], rows.shape[1], cols.shape[1]

    def body(t, acc):
        idx, w = _step_corners(rows, cols, wy, wx, need, t)
        v = [jnp.take(table, i, axis=0, mode="clip").astype(jnp.float32) for i in idx]
        return acc + (((w[0][..., None] * v[0] + w[1][..., None] * v[1]) + w[2][..., None] * v[2])
                      + w[3][..., None] * v[3])

    zero = jnp.zeros((r, oh, ow, table.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, need[0] * need[1], body, zero)


def _gather_sum_fwd(spec, table, rows, cols, wy, wx, need, gh, gw):
    return _gather_sum(spec, table, rows, cols, wy, wx, need, gh, gw), (rows, cols, wy, wx, need, gh, gw)


def _scatter_corners(grad, ry, cx, vy, vx, ct):
    """Adds ``w * ct`` at the 4 corners of one sample of every bin: ``ry`` / ``vy`` (K, oh, 2), ``cx`` / ``vx``
    (K, ow, 2), ``ct`` (K, oh, ow, C); mmcv's corner order."""
    c = grad.shape[1]
    for a in (0, 1):
        for b in (0, 1):
            i = ry[:, :, None, a] + cx[:, None, :, b]
            w = vy[:, :, None, a] * vx[:, None, :, b]
            grad = grad.at[i.reshape(-1)].add((w[..., None] * ct).reshape(-1, c), mode="clip")
    return grad


def _gather_sum_bwd(spec, res, ct):
    """The transpose: scatter-adds of ``w * ct`` at every used sample's 4 corners (see :func:`_pool`)."""
    (shape, dtype, mode), (rows, cols, wy, wx, need, gh, gw) = spec, res
    ct = ct.astype(jnp.float32)
    zero = jnp.zeros(shape, jnp.float32)
    nones = (None,) * 8
    if mode == "rows":  # every roi in each of the max(gh) * max(gw) steps
        def body(t, grad):
            idx, w = _step_corners(rows, cols, wy, wx, need, t)
            for i, wi in zip(idx, w):
                grad = grad.at[i.reshape(-1)].add((wi[..., None] * ct).reshape(-1, shape[1]), mode="clip")
            return grad

        return (jax.lax.fori_loop(0, need[0] * need[1], body, zero).astype(dtype),) + nones[1:]

    # Compact: the (roi, sample) pairs the rois use, roi-major, in chunks of K = R pairs. Pair j belongs to the
    # roi whose cumulative count first exceeds j; its sample is (local // gw, local % gw) of that roi's grid.
    r = rows.shape[0]
    gh = jnp.maximum(gh, 0)
    gw = jnp.maximum(gw, 0)
    count = gh * gw
    ends = jnp.cumsum(count)
    total = ends[-1] if r else jnp.int32(0)
    lane = jnp.arange(r, dtype=jnp.int32)
    oh_i = jnp.arange(rows.shape[1])[None, :]
    ow_i = jnp.arange(cols.shape[1])[None, :]

    def body(k, grad):
        j = k * r + lane
        live = j < total
        ri = jnp.minimum(jnp.searchsorted(ends, j, side="right"), r - 1).astype(jnp.int32)
        local = j - (ends[ri] - count[ri])
        gwr = jnp.maximum(gw[ri], 1)
        iy, ix = local // gwr, local % gwr
        ry = rows[ri[:, None], oh_i, iy[:, None]]  # (K, oh, 2)
        cx = cols[ri[:, None], ow_i, ix[:, None]]  # (K, ow, 2)
        vy = wy[ri[:, None], oh_i, iy[:, None]] * live[:, None, None].astype(jnp.float32)
        vx = wx[ri[:, None], ow_i, ix[:, None]]
        return _scatter_corners(grad, ry, cx, vy, vx, ct[ri])

    chunks = (total + r - 1) // max(r, 1)
    return (jax.lax.fori_loop(0, chunks, body, zero).astype(dtype),) + nones[1:]


_gather_sum.defvjp(_gather_sum_fwd, _gather_sum_bwd)


def _pool_vectorized(table, base, level_h, level_w, starts, bins, grids, out_hw: Tuple[int, int],
                     g_max: Tuple[int, int], backward: str = "compact"):
    """Same result as :func:`_pool` in one gather of ``(R, oh, Gh, 2, ow, Gw, 2, C)`` and one reduction.

    Not used by default: unless XLA fuses the gather into the reduction (XLA:CPU does not) it materialises
    ``16 * R * oh * ow * Gh * Gw * C`` bytes (12.8 GB for R=1000, 7x7, G=8, C=256). Kept for benchmarking
    (``backward`` is ignored: its gradient is XLA's transpose of the gather).
    """
    oh, ow = out_hw
    ylo, yhi, wylo, wyhi = _axis_samples(starts[0], bins[0], grids[0], level_h, oh, g_max[0])
    xlo, xhi, wxlo, wxhi = _axis_samples(starts[1], bins[1], grids[1], level_w, ow, g_max[1])
    ys = jnp.stack([ylo, yhi], axis=-1)  # (R, oh, Gh, 2)
    xs = jnp.stack([xlo, xhi], axis=-1)  # (R, ow, Gw, 2)
    wy = jnp.stack([wylo, wyhi], axis=-1)
    wx = jnp.stack([wxlo, wxhi], axis=-1)
    row = (base[:, None, None, None] + ys * level_w[:, None, None, None])  # (R, oh, Gh, 2)
    idx = row[:, :, :, :, None, None, None] + xs[:, None, None, None, :, :, :]  # (R, oh, Gh, 2, ow, Gw, 2)
    w = wy[:, :, :, :, None, None, None] * wx[:, None, None, None, :, :, :]
    vals = jnp.take(table, idx, axis=0, mode="clip")  # (R, oh, Gh, 2, ow, Gw, 2, C)
    acc = jnp.sum(vals.astype(jnp.float32) * w[..., None], axis=(2, 3, 5, 6))  # (R, oh, ow, C)
    count = jnp.maximum(grids[0] * grids[1], 1).astype(jnp.float32)
    return acc / count[:, None, None, None]


def _grids(bin_h, bin_w, sampling_ratio: int, g_max: Tuple[int, int]):
    """Effective per-roi sample counts: ``sampling_ratio`` or ``min(ceil(bin), G)`` (clipped at 0, NaN -> 0)."""
    if sampling_ratio > 0:
        r = bin_h.shape[0]
        return jnp.full((r,), sampling_ratio, jnp.int32), jnp.full((r,), sampling_ratio, jnp.int32)

    def one(bin_size, g):
        # mmcv: (int)ceil(roi_size / out) == ceil(bin_size) (the same float32 division).
        c = jnp.clip(jnp.ceil(bin_size), 0.0, float(g))
        return jnp.where(jnp.isnan(c), 0.0, c).astype(jnp.int32)

    return one(bin_h, g_max[0]), one(bin_w, g_max[1])


def _roi_geometry(rois, scale, out_hw: Tuple[int, int], aligned: bool):
    """mmcv roi start / bin sizes in float32 for rois (R, 5) and per-roi (or scalar) spatial scale."""
    offset = jnp.float32(0.5 if aligned else 0.0)
    start_w = rois[:, 1] * scale - offset
    start_h = rois[:, 2] * scale - offset
    end_w = rois[:, 3] * scale - offset
    end_h = rois[:, 4] * scale - offset
    roi_w = end_w - start_w
    roi_h = end_h - start_h
    if not aligned:
        roi_w = jnp.maximum(roi_w, 1.0)
        roi_h = jnp.maximum(roi_h, 1.0)
    bin_h = _div(roi_h, jnp.float32(out_hw[0]))  # exact division: ceil(bin) is the adaptive grid
    bin_w = _div(roi_w, jnp.float32(out_hw[1]))
    return (start_h, start_w), (bin_h, bin_w)


def _batch_index(rois, batch: int):
    # mmcv: int roi_batch_ind = offset_rois[0] (truncation); clipped for safety.
    return jnp.clip(rois[:, 0].astype(jnp.int32), 0, batch - 1)


def roi_align(features, rois, output_size: IntPair, spatial_scale: float, sampling_ratio: int = 0,
              aligned: bool = True, *, max_samples: Optional[IntPair] = None,
              backward: str = "compact") -> jnp.ndarray:
    """mmcv ``RoIAlign(output_size, spatial_scale, sampling_ratio, pool_mode='avg', aligned)`` on NHWC features.

    Args:
      features: ``(B, H, W, C)``.
      rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image pixels.
      output_size: ``oh`` or ``(oh, ow)``.
      spatial_scale: feature pixels per input pixel (``1 / stride``); a Python float or a traced scalar.
      sampling_ratio: ``> 0``: that many samples per bin axis (static grid, always exact); ``0``: mmcv's adaptive
        ``ceil(roi / out)`` grid, reproduced with the masked static grid ``max_samples``.
      aligned: mmcv ``aligned`` (``-0.5`` pixel shift, no minimum roi size) or the legacy mode.
      max_samples: ``G`` or ``(Gh, Gw)`` static max samples per bin axis for ``sampling_ratio == 0``; default
        :func:`default_max_samples`. Exact iff every roi's adaptive grid is ``<= (Gh, Gw)``, capped otherwise
        (module docstring).
      backward: the gradient's scatter-adds: ``'compact'`` (default; only the samples each roi uses) or
        ``'rows'`` (the forward's ``max(gh) * max(gw)`` steps over every roi); same values up to addition order.

    Returns:
      ``(R, oh, ow, C)`` in ``features.dtype`` (computed in float32). Jit-able (all arguments but ``features``,
      ``rois`` and ``spatial_scale`` must be static) and differentiable w.r.t. ``features``.
    """
    out_hw = _pair(output_size, "output_size")
    features = jnp.asarray(features)
    if features.ndim != 4:
        raise ValueError(f"features must be (B, H, W, C), got {features.shape}")
    h, w = features.shape[1:3]
    if sampling_ratio > 0:
        g_max = (int(sampling_ratio), int(sampling_ratio))
    elif max_samples is None:
        g_max = default_max_samples((h, w), out_hw)
    else:
        g_max = _pair(max_samples, "max_samples")
    return _roi_align(features, jnp.asarray(rois), jnp.asarray(spatial_scale, jnp.float32), out_hw,
                      int(sampling_ratio), bool(aligned), g_max, str(backward))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _roi_align(features, rois, spatial_scale, out_hw, sampling_ratio, aligned, g_max, backward):
    b, h, w, c = features.shape
    rois = jax.lax.stop_gradient(jnp.asarray(rois, jnp.float32))
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (R, 5), got {rois.shape}")
    r = rois.shape[0]
    starts, bins = _roi_geometry(rois, spatial_scale, out_hw, aligned)
    grids = _grids(bins[0], bins[1], sampling_ratio, g_max)
    base = _batch_index(rois, b) * (h * w)
    table = features.reshape(b * h * w, c)
    out = _pool(table, base, jnp.full((r,), h, jnp.int32), jnp.full((r,), w, jnp.int32), starts, bins, grids,
                out_hw, g_max, backward)
    return out.astype(features.dtype)


def multilevel_roi_align(feats: Sequence, rois, output_size: IntPair, *, strides: Sequence[int] = FPN_STRIDES,
                         finest_scale: float = 56.0, sampling_ratio: int = 0, aligned: bool = True,
                         max_samples: Optional[IntPair] = None, backward: str = "compact") -> jnp.ndarray:
    """mmdet 2.11 ``SingleRoIExtractor`` with mmcv ``RoIAlign`` layers.

    Args:
      feats: list of ``L`` NHWC levels ``(B, H_l, W_l, C)`` (P2-P5 for the Mask R-CNN heads); only the first
        ``len(strides)`` are used (mmdet uses ``feats[:num_levels]``).
      rois: ``(R, 5)`` ``[batch_index, x1, y1, x2, y2]`` in input-image pixels.
      output_size: ``oh`` or ``(oh, ow)`` (7 for the box head, 14 for the mask head).
      strides: level strides; level ``l`` is pooled with ``spatial_scale = 1 / strides[l]``.
      finest_scale: mmdet's ``finest_scale`` (56); the level of each roi is :func:`map_roi_levels`.
      sampling_ratio, aligned: as :func:`roi_align` (mmdet: 0, True).
      max_samples: static max grid per bin axis; default ``ceil(max(4 * finest_scale / strides[0],
        coarsest level size) / out)`` per axis (module docstring for when this is exact).
      backward: as :func:`roi_align`.

    Returns:
      ``(R, oh, ow, C)``; rois with no level (NaN scale, see :func:`map_roi_levels`) are zeros, as in mmdet.
    """
    out_hw = _pair(output_size, "output_size")
    strides = tuple(int(s) for s in strides)
    num_levels = len(strides)
    if len(feats) < num_levels:
        raise ValueError(f"need {num_levels} feature levels, got {len(feats)}")
    feats = [jnp.asarray(f) for f in feats[:num_levels]]
    level_hw = tuple((int(f.shape[1]), int(f.shape[2])) for f in feats)
    b, c = feats[0].shape[0], feats[0].shape[3]
    for f in feats:
        if f.ndim != 4 or f.shape[0] != b or f.shape[3] != c:
            raise ValueError(f"levels must be (B, H, W, C) with common B and C, got {[x.shape for x in feats]}")
    if sampling_ratio > 0:
        g_max = (int(sampling_ratio), int(sampling_ratio))
    elif max_samples is None:
        g_max = _multilevel_default_max_samples(level_hw, out_hw, strides, finest_scale)
    else:
        g_max = _pair(max_samples, "max_samples")
    return _multilevel_roi_align(tuple(feats), jnp.asarray(rois), out_hw, strides, float(finest_scale),
                                 int(sampling_ratio), bool(aligned), g_max, str(backward))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7, 8))
def _multilevel_roi_align(feats, rois, out_hw, strides, finest_scale, sampling_ratio, aligned, g_max, backward):
    num_levels = len(strides)
    b, c = feats[0].shape[0], feats[0].shape[3]
    level_hw = [(f.shape[1], f.shape[2]) for f in feats]
    sizes = [h * w for h, w in level_hw]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    total = int(sum(sizes))
    dtype = jnp.result_type(*feats)
    # One (B * sum_l H_l W_l, C) table: row b * total + offset_l + y * W_l + x.
    table = jnp.concatenate([f.astype(dtype).reshape(b, -1, c) for f in feats], axis=1).reshape(b * total, c)

    rois = jax.lax.stop_gradient(jnp.asarray(rois, jnp.float32))
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (R, 5), got {rois.shape}")
    lvl = map_roi_levels(rois, num_levels, finest_scale)
    has_level = lvl >= 0
    li = jnp.maximum(lvl, 0)
    scale = jnp.asarray(np.array([1.0 / s for s in strides], np.float32))[li]  # float(1/stride) -> fp32, as mmcv
    level_h = jnp.asarray(np.array([h for h, _ in level_hw], np.int32))[li]
    level_w = jnp.asarray(np.array([w for _, w in level_hw], np.int32))[li]
    base = _batch_index(rois, b) * total + jnp.asarray(offsets)[li]
    starts, bins = _roi_geometry(rois, scale, out_hw, aligned)
    grids = _grids(bins[0], bins[1], sampling_ratio, g_max)
    out = _pool(table, base, level_h, level_w, starts, bins, grids, out_hw, g_max, backward)
    out = jnp.where(has_level[:, None, None, None], out, 0.0)
    return out.astype(dtype)
