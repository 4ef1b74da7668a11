"""lit_jax.ops.roi_align against a plain numpy loop of mmcv 1.3's RoIAlign (avg) and mmdet's SingleRoIExtractor."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.ops.roi_align import map_roi_levels, multilevel_roi_align, roi_align

f32 = np.float32


# ---- independent reference: mmcv roi_align_forward_cuda_kernel (pool_mode=1), one scalar sample at a time ----
def _bilinear(img, y, x):
    """mmcv bilinear_interpolate for one point; img (H, W, C) float32; y, x float32 scalars."""
    H, W, C = img.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return np.zeros(C, np.float64)
    if y <= 0:
        y = f32(0)
    if x <= 0:
        x = f32(0)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_high = y_low = H - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_high = x_low = W - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = f32(y - f32(y_low)), f32(x - f32(x_low))
    hy, hx = f32(1) - ly, f32(1) - lx
    w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
    v = (w1 * img[y_low, x_low].astype(np.float64) + w2 * img[y_low, x_high] + w3 * img[y_high, x_low]
         + w4 * img[y_high, x_high])
    return v


def ref_roi_align(feat, rois, out, scale, sampling_ratio=0, aligned=True, grid_cap=None):
    """feat (B, H, W, C); rois (R, 5). grid_cap=(Gh, Gw) caps the adaptive grid (documented jax behaviour)."""
    feat = np.asarray(feat, f32)
    B, H, W, C = feat.shape
    oh, ow = out
    res = np.zeros((len(rois), oh, ow, C), np.float64)
    for n, roi in enumerate(np.asarray(rois, f32)):
        b = int(roi[0])
        off = f32(0.5) if aligned else f32(0)
        sw, sh = f32(roi[1] * f32(scale)) - off, f32(roi[2] * f32(scale)) - off
        ew, eh = f32(roi[3] * f32(scale)) - off, f32(roi[4] * f32(scale)) - off
        rw, rh = f32(ew - sw), f32(eh - sh)
        if not aligned:
            rw, rh = max(rw, f32(1)), max(rh, f32(1))
        bh, bw = f32(rh / f32(oh)), f32(rw / f32(ow))
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(f32(rh / f32(oh))))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(f32(rw / f32(ow))))
        if grid_cap is not None:
            gh, gw = min(gh, grid_cap[0]), min(gw, grid_cap[1])
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = np.zeros(C, np.float64)
                for iy in range(gh):
                    y = f32(f32(sh + f32(ph) * bh) + f32(f32(f32(iy) + f32(0.5)) * bh) / f32(gh))
                    for ix in range(gw):
                        x = f32(f32(sw + f32(pw) * bw) + f32(f32(f32(ix) + f32(0.5)) * bw) / f32(gw))
                        acc += _bilinear(feat[b], y, x)
                res[n, ph, pw] = acc / count
    return res


def ref_levels(rois, finest_scale=56.0, num_levels=4):
    rois = np.asarray(rois, f32)
    s = np.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    lv = np.floor(np.log2(s / f32(finest_scale) + f32(1e-6)))
    return np.clip(lv, 0, num_levels - 1).astype(np.int64)


def _close(got, ref):
    got = np.asarray(got, np.float64)
    tol = 1e-5 * max(np.abs(ref).max(), 1e-30)
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def _feat(rng, shape):
    return rng.standard_normal(shape).astype(f32)


# Rois on a (2, 13, 19, 3) map with stride 4 (image ~52 x 76): each kind of edge case.
ROIS = np.array([
    [0, 10.0, 8.0, 40.0, 30.0],     # generic
    [1, 3.3, 5.7, 61.9, 47.2],      # other batch index, non-integer
    [0, -20.0, -12.0, 18.0, 25.0],  # partly outside (top-left)
    [1, 50.0, 30.0, 95.0, 70.0],    # partly outside (bottom-right)
    [0, 100.0, 80.0, 140.0, 120.0], # fully outside
    [1, -60.0, -50.0, -30.0, -20.0],  # fully outside (negative)
    [0, 20.2, 20.3, 20.9, 20.6],    # tiny (sub-pixel after scaling)
    [1, 12.0, 16.0, 36.0, 44.0],    # exact integer coordinates
    [0, 30.0, 30.0, 30.0, 30.0],    # zero-size
    [1, 40.0, 20.0, 30.0, 10.0],    # inverted
    [0, 0.0, 0.0, 76.0, 52.0],      # whole image
    [1, 2.0, 40.0, 74.0, 50.0],     # wide and flat
], np.float32)


@pytest.mark.parametrize("sampling_ratio,aligned", [(0, True), (0, False), (2, True), (2, False)])
def test_roi_align_matches_mmcv_loop(sampling_ratio, aligned):
    rng = np.random.default_rng(0)
    feat = _feat(rng, (2, 13, 19, 3))
    out = (7, 5)  # non-square output too
    got = roi_align(feat, ROIS, out, 0.25, sampling_ratio, aligned)
    ref = ref_roi_align(feat, ROIS, out, 0.25, sampling_ratio, aligned)
    assert got.shape == (len(ROIS), 7, 5, 3) and got.dtype == jnp.float32
    _close(got, ref)
    # Fully-outside, zero-size and inverted aligned rois give exact zeros, as mmcv.
    if aligned and sampling_ratio == 0:
        assert np.all(np.asarray(got)[[4, 5, 8, 9]] == 0)


def test_roi_align_integer_coords_exact_grid_points():
    """Aligned, scale 1, a 14 px box at out 7: 2x2 samples at x.25/x.75 of each pixel pair -> linear map exact."""
    H, W = 9, 20
    yy, xx = np.meshgrid(np.arange(H, dtype=f32), np.arange(W, dtype=f32), indexing="ij")
    feat = np.stack([yy, xx], -1)[None]  # value = (row, col)
    rois = np.array([[0, 3.0, 1.0, 17.0, 8.0]], f32)  # roi_w 14, roi_h 7 -> grids 2 x 1
    got = np.asarray(roi_align(feat, rois, 7, 1.0))
    # Bilinear of a linear map is exact: the bin mean is the bin centre minus the 0.5 alignment shift.
    cy = 1.0 - 0.5 + (np.arange(7) + 0.5) * 1.0
    cx = 3.0 - 0.5 + (np.arange(7) + 0.5) * 2.0
    np.testing.assert_allclose(got[0, :, :, 0], np.broadcast_to(cy[:, None], (7, 7)), atol=1e-6)
    np.testing.assert_allclose(got[0, :, :, 1], np.broadcast_to(cx[None, :], (7, 7)), atol=1e-6)


def test_roi_align_huge_box_adaptive_grid_and_cap():
    """A box over a 40x64 map at scale 1, out 7: adaptive grid 6 x 10 samples per bin."""
    rng = np.random.default_rng(1)
    feat = _feat(rng, (1, 40, 64, 4))
    # Smooth features too (cap error is a quadrature error, small on smooth maps, larger on white noise).
    yy, xx = np.meshgrid(np.linspace(0, 3, 40), np.linspace(0, 5, 64), indexing="ij")
    smooth = np.stack([np.sin(yy) * np.cos(xx), np.cos(yy + xx)], -1)[None].astype(f32)
    rois = np.array([[0, -3.0, -2.0, 70.0, 45.0], [0, 0.0, 0.0, 64.0, 40.0]], f32)
    ref = ref_roi_align(feat, rois, (7, 7), 1.0)
    # Default max grid = ceil(40/7) x ceil(64/7) = 6 x 10: exact for the in-map roi; the first roi's grid
    # ceil(47/7)=7 x ceil(73/7)=11 exceeds it and is capped.
    got = np.asarray(roi_align(feat, rois, 7, 1.0))
    _close(got[1:], ref[1:])
    _close(got[:1], ref_roi_align(feat, rois[:1], (7, 7), 1.0, grid_cap=(6, 10)))
    # Explicit generous max_samples: exact for both.
    _close(roi_align(feat, rois, 7, 1.0, max_samples=(7, 11)), ref)
    # Capped grid (3 x 3): equals mmcv with the capped grid, i.e. sampling_ratio=3 ...
    capped = np.asarray(roi_align(feat, rois, 7, 1.0, max_samples=3))
    _close(capped, ref_roi_align(feat, rois, (7, 7), 1.0, grid_cap=(3, 3)))
    _close(capped, ref_roi_align(feat, rois, (7, 7), 1.0, sampling_ratio=3))
    # ... and differs from the exact adaptive result by a quadrature error, measured here (max |diff| per roi
    # relative to max |ref|). Measured: white noise ~1.5 (bin means of iid noise are small, so any change of the
    # sample set is large relative to them); smooth map 3.4e-3 for the in-map roi, 0.12 for the roi that sticks
    # out of the map (the coarse grid moves samples across the zero cliff at -1 / W).
    rel = lambda a, r: np.abs(a - r).max(axis=(1, 2, 3)) / np.abs(r).max()
    ref_s = ref_roi_align(smooth, rois, (7, 7), 1.0)
    cap_s = np.asarray(roi_align(smooth, rois, 7, 1.0, max_samples=3))
    rel_noise, rel_smooth = rel(capped, ref), rel(cap_s, ref_s)
    print(f"capped 3x3 vs adaptive (7x11 / 6x10): max rel diff per roi [outside, inside]: "
          f"white noise {rel_noise}, smooth {rel_smooth}")
    assert rel_noise.min() > 0.1  # the cap is observable ...
    assert rel_smooth[1] < 5e-3  # ... small on smooth features inside the map ...
    assert rel_smooth[0] > 0.05  # ... but not near the map border.


def test_map_roi_levels_thresholds():
    """Square boxes of side exactly 112, 224, 448 start levels 1, 2, 3; just below stay one level lower."""
    sides = np.array([1.0, 50.0, 111.9, 112.0, 150.0, 223.9, 224.0, 300.0, 447.9, 448.0, 900.0], f32)
    rois = np.stack([np.zeros_like(sides), np.full_like(sides, 5.0), np.full_like(sides, 7.0),
                     5.0 + sides, 7.0 + sides], 1)
    got = np.asarray(map_roi_levels(rois))
    np.testing.assert_array_equal(got, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    np.testing.assert_array_equal(got, ref_levels(rois))
    # Non-square: sqrt(w*h) decides (56 x 224 -> sqrt = 112 -> level 1).
    assert int(map_roi_levels(np.array([[0, 0, 0, 56.0, 224.0]], f32))[0]) == 1
    # Inverted on one axis -> NaN scale -> no level (mmdet leaves zeros).
    assert int(map_roi_levels(np.array([[0, 10.0, 0, 5.0, 20.0]], f32))[0]) == -1


def test_multilevel_roi_align_each_level():
    rng = np.random.default_rng(2)
    img_h, img_w = 256, 320  # non-square; P2..P5 = 64x80, 32x40, 16x20, 8x10
    strides = (4, 8, 16, 32)
    feats = [_feat(rng, (2, img_h // s, img_w // s, 3)) for s in strides]
    rois = np.array([
        [0, 10.0, 20.0, 60.0, 70.0],      # 50 -> P2
        [1, 100.0, 30.0, 211.9, 141.9],   # 111.9 -> P2
        [0, 100.0, 30.0, 212.0, 142.0],   # 112 -> P3
        [1, 5.0, 5.0, 229.0, 229.0],      # 224 -> P4
        [0, 5.0, 5.0, 228.9, 228.9],      # 223.9 -> P3
        [1, 0.0, 0.0, 320.0, 256.0],      # 286 -> P4
        [0, -100.0, -40.0, 348.0, 256.0],  # sqrt(448*296)=364 -> P4, partly outside
        [1, -64.0, -96.0, 384.0, 352.0],  # 448 -> P5, partly outside
        [0, 0.0, 240.0, 320.0, 250.0],    # wide, flat: sqrt(3200)=56.6 -> P2, grid_w = ceil(80/7) = 12 > 8
    ], f32)
    lv = ref_levels(rois)
    np.testing.assert_array_equal(lv, [0, 0, 1, 2, 1, 2, 2, 3, 0])
    np.testing.assert_array_equal(map_roi_levels(rois), lv)
    for out in (7, 14):
        got = np.asarray(multilevel_roi_align(feats, rois, out))
        ref = np.stack([ref_roi_align(feats[l], rois[i:i + 1], (out, out), 1.0 / strides[l])[0]
                        for i, l in enumerate(lv)])
        # Default max grid (8 for 7x7, 4 for 14x14) is exact for all but the last roi (its grid is 1 x 12 at 7x7
        # and 1 x 6 at 14x14), which is capped.
        _close(got[:-1], ref[:-1])
        cap = 8 if out == 7 else 4
        _close(got[-1:], ref_roi_align(feats[0], rois[-1:], (out, out), 0.25, grid_cap=(cap, cap)))
        big = np.asarray(multilevel_roi_align(feats, rois, out, max_samples=12))
        _close(big, ref)


def test_roi_align_jit_and_grad():
    rng = np.random.default_rng(3)
    feat = jnp.asarray(_feat(rng, (2, 6, 9, 2)))
    rois = jnp.asarray(ROIS[[0, 1, 2, 3, 6, 7]] * np.array([1, 0.5, 0.5, 0.5, 0.5], f32))
    ct = jnp.asarray(_feat(rng, (6, 3, 3, 2)))

    f = jax.jit(lambda x, r: roi_align(x, r, 3, 0.25))
    np.testing.assert_allclose(f(feat, rois), roi_align(feat, rois, 3, 0.25), rtol=1e-6, atol=1e-6)
    loss = lambda x: jnp.sum(f(x, rois) * ct)
    g = jax.grad(loss)(feat)
    assert g.shape == feat.shape and bool(jnp.all(jnp.isfinite(g)))
    # The op is linear in the features: the gradient is its adjoint, <ct, A x> == <A^T ct, x>, and it equals a
    # central finite difference along a random direction (float64 numpy reference for the forward).
    np.testing.assert_allclose(float(jnp.sum(g * feat)), float(loss(feat)), rtol=1e-5)
    d = _feat(rng, feat.shape)
    eps = 1e-2
    ref_f = lambda x: float(np.sum(ref_roi_align(x, np.asarray(rois), (3, 3), 0.25) * np.asarray(ct)))
    fd = (ref_f(np.asarray(feat) + eps * d) - ref_f(np.asarray(feat) - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(g * d)), fd, rtol=1e-3)
    # No gradient to the rois (mmcv returns None for them).
    gr = jax.grad(lambda r: jnp.sum(f(feat, r) * ct))(rois)
    assert bool(jnp.all(gr == 0))
    # Multilevel gradient reaches every level used.
    feats = [feat, feat[:, ::2, ::2]]
    rois_ml = jnp.asarray([[0, 1.0, 1.0, 20.0, 20.0], [1, 0.0, 0.0, 40.0, 30.0]], jnp.float32)
    gml = jax.grad(lambda fs: jnp.sum(multilevel_roi_align(fs, rois_ml, 2, strides=(4, 8), finest_scale=10.0)))(
        feats)
    assert all(bool(jnp.all(jnp.isfinite(x))) and float(jnp.abs(x).sum()) > 0 for x in gml)


def test_vectorized_pool_variant_matches(monkeypatch):
    """The benchmark-only one-gather variant gives the same values as the default sample loop."""
    import importlib
    # (``import lit_jax.ops.roi_align as ra`` would give the function: lit_jax.ops re-exports it under that name.)
    ra = importlib.import_module("lit_jax.ops.roi_align")
    rng = np.random.default_rng(4)
    feat = _feat(rng, (2, 11, 7, 2))  # shapes used nowhere else, so the jit cache holds no loop version
    rois = ROIS[:8] * np.array([1, 0.4, 0.6, 0.4, 0.6], f32)
    loop = np.asarray(roi_align(feat, rois, (3, 4), 0.25, max_samples=3))
    monkeypatch.setattr(ra, "_pool", ra._pool_vectorized)
    vec = np.asarray(roi_align(feat, rois, (3, 4), 0.25, max_samples=(3, 2)))  # new static arg: traced anew
    ref = ref_roi_align(feat, rois, (3, 4), 0.25, grid_cap=(3, 2))
    _close(vec, ref)
    _close(loop, ref_roi_align(feat, rois, (3, 4), 0.25, grid_cap=(3, 3)))


# Rois on a (1, 25, 42) stride-32 map (an 800 x 1344 canvas) touching each edge. Several have bins that are whole
# numbers of feature pixels (42 / 14 = 3): XLA used to turn ``roi_w / 14`` into ``roi_w * (1 / 14)`` = 3.0000002,
# whose ceil made the adaptive grid 4 instead of mmcv's 3 whenever max_samples allowed 4 (issue 12 item 7).
EDGE_ROIS = np.array([
    [0, 0.0, 0.0, 1344.0, 768.0],     # issue 12: x from 0 to the right edge
    [0, 0.0, 0.0, 1344.0, 800.0],     # whole map
    [0, 0.0, 200.0, 448.0, 648.0],    # left edge, 14 px -> bins of exactly 1 pixel
    [0, 896.0, 96.0, 1344.0, 544.0],  # right edge
    [0, 320.0, 0.0, 768.0, 448.0],    # top edge
    [0, 128.0, 352.0, 576.0, 800.0],  # bottom edge
    [0, 1.0, 0.0, 1344.0, 768.0],     # as the first, starting at x = 1 (was already exact)
    [0, -224.0, -96.0, 1568.0, 992.0],  # beyond the map on every side
    [0, 1000.0, 600.0, 1500.0, 900.0],  # beyond the bottom-right corner
    [0, -300.0, 100.0, 20.0, 300.0],  # mostly left of the map
], np.float32)


def _adaptive_need(rois, out, scale):
    """Largest mmcv adaptive grid per axis over ``rois`` (aligned), in numpy float32."""
    r = np.asarray(rois, f32)
    x = r[:, 1:] * f32(scale) - f32(0.5)
    h, w = (x[:, 3] - x[:, 1]) / f32(out), (x[:, 2] - x[:, 0]) / f32(out)
    return int(np.ceil(h).max()), int(np.ceil(w).max())


def test_roi_align_edge_rois_any_max_samples():
    """Every edge roi equals mmcv at 1e-5 with the default grid and with grids of 1x, 2x and 10x the need."""
    rng = np.random.default_rng(5)
    feat = _feat(rng, (1, 25, 42, 3))
    scale, out = 1.0 / 32, 14
    need = _adaptive_need(EDGE_ROIS, out, scale)
    assert need == (3, 4)
    ref = ref_roi_align(feat, EDGE_ROIS, (out, out), scale)
    # Default grid ceil(25 / 14) x ceil(42 / 14) = 2 x 3: exact for rois inside the map, capped beyond it.
    default = ref_roi_align(feat, EDGE_ROIS, (out, out), scale, grid_cap=(2, 3))
    _close(roi_align(feat, EDGE_ROIS, out, scale), default)
    _close(np.asarray(roi_align(feat, EDGE_ROIS, out, scale))[:7], ref[:7])
    for k in (1, 2, 10):
        _close(roi_align(feat, EDGE_ROIS, out, scale, max_samples=(k * need[0], k * need[1])), ref)
    # The multilevel extractor shares the geometry: the whole-map roi (level 3) with a generous grid.
    feats = [_feat(rng, (1, 800 // s, 1344 // s, 2)) for s in (4, 8, 16, 32)]
    got = multilevel_roi_align(feats, EDGE_ROIS[:2], out, max_samples=10)
    _close(got, ref_roi_align(feats[3], EDGE_ROIS[:2], (out, out), scale))


@pytest.mark.parametrize("max_samples", [None, 2])
def test_compact_backward_matches_row_backward(max_samples):
    """The default backward scatters only the samples each roi uses; the earlier one every roi in every step of
    the batch's largest grid. Same gradient up to addition order, for every kind of roi (edges, outside the map,
    inverted, capped grids with max_samples=2), one level and several."""
    rng = np.random.default_rng(7)
    feat = jnp.asarray(_feat(rng, (2, 13, 17, 3)))
    rois = jnp.asarray(np.concatenate([ROIS, EDGE_ROIS * np.array([1, 0.05, 0.05, 0.05, 0.05], f32)]))
    ct = jnp.asarray(_feat(rng, (rois.shape[0], 3, 4, 3)))
    feats = (feat, feat[:, ::2, ::2] * 2.0, feat[:, ::4, ::4] - 1.0)
    ml_rois = rois * jnp.asarray([1, 2.0, 2.0, 2.0, 2.0], jnp.float32)

    def grads(backward):
        single = jax.grad(lambda x: jnp.sum(roi_align(x, rois, (3, 4), 0.25, max_samples=max_samples,
                                                      backward=backward) * ct))(feat)
        multi = jax.grad(lambda fs: jnp.sum(multilevel_roi_align(fs, ml_rois, (3, 4), strides=(4, 8, 16),
                                                                 finest_scale=8.0, max_samples=max_samples,
                                                                 backward=backward) * ct))(feats)
        return [single, *multi]

    compact, rows = grads("compact"), grads("rows")
    assert any(float(jnp.abs(g).max()) > 0 for g in rows[1:])
    for a, b in zip(compact, rows):
        _close(a, np.asarray(b, np.float64))
    with pytest.raises(ValueError, match="backward"):
        roi_align(feat, rois, 3, 0.25, backward="scatter")
