"""lit_jax.ops.deform_conv2d against an independent per-pixel numpy loop of the mmcv DCNv1 rules."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.ops import deform_conv2d


def _bilinear_mmcv(img: np.ndarray, h: float, w: float) -> np.ndarray:
    """mmcv deformable_im2col_bilinear for one point; img (H, W, C) float64. Caller checked -1 < h < H, -1 < w < W."""
    H, W, C = img.shape
    h_low, w_low = int(np.floor(h)), int(np.floor(w))
    h_high, w_high = h_low + 1, w_low + 1
    lh, lw = h - h_low, w - w_low
    hh, hw = 1.0 - lh, 1.0 - lw
    val = np.zeros(C)
    for (hi, wi, wt) in ((h_low, w_low, hh * hw), (h_low, w_high, hh * lw), (h_high, w_low, lh * hw),
                         (h_high, w_high, lh * lw)):
        if 0 <= hi <= H - 1 and 0 <= wi <= W - 1:
            val += wt * img[hi, wi]
    return val


def _ref_deform_conv(x, offsets, kernel, bias, stride, padding, f32_coords=True):
    """Plain loop over (b, ho, wo, i, j). x NHWC, offsets (B,Ho,Wo,2*kh*kw) [dy,dx per tap], kernel HWIO.

    The sample coordinates are formed in float32 like the CUDA/CPU kernels (f32_coords=True) or in float64 (for
    finite differences); everything else is float64.
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    B, H, W, Cin = x.shape
    kh, kw, _, Cout = kernel.shape
    sh, sw = stride
    ph, pw = padding
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    ct = np.float32 if f32_coords else np.float64
    offsets = np.asarray(offsets).astype(ct)
    out = np.zeros((B, Ho, Wo, Cout))
    for b in range(B):
        for oh in range(Ho):
            for ow in range(Wo):
                acc = np.zeros(Cout) if bias is None else np.asarray(bias, np.float64).copy()
                for i in range(kh):
                    for j in range(kw):
                        t = i * kw + j
                        dy, dx = offsets[b, oh, ow, 2 * t], offsets[b, oh, ow, 2 * t + 1]
                        h = float(ct(oh * sh - ph + i) + dy)
                        w = float(ct(ow * sw - pw + j) + dx)
                        if not (-1 < h < H and -1 < w < W):
                            continue
                        acc += _bilinear_mmcv(x[b], h, w) @ kernel[i, j]
                out[b, oh, ow] = acc
    return out


def _out_hw(H, W, k, s, p):
    return (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1


def _make_offsets(rng, B, Ho, Wo, k, s, p, H, W, scale):
    """Random offsets, many samples outside, some exactly on integers and on the -1 / H / W boundaries."""
    K = k * k
    off = (rng.standard_normal((B, Ho, Wo, K, 2)) * scale).astype(np.float32)
    # ~25% integer offsets (samples land exactly on pixel centres, including border rows/cols).
    m = rng.random((B, Ho, Wo, K, 2)) < 0.25
    off[m] = np.round(off[m])
    # Half-integers too.
    m = rng.random((B, Ho, Wo, K, 2)) < 0.1
    off[m] = np.round(off[m]) + 0.5
    # Force some sample coordinates to exact boundary values.
    base_h = (np.arange(Ho)[:, None] * s - p + np.arange(k)[None, :])  # (Ho, k) for tap row i
    base_w = (np.arange(Wo)[:, None] * s - p + np.arange(k)[None, :])
    targets_h = np.array([-1.0, H, H - 1.0, 0.0, -0.5, H - 0.5, -1.0 + 2.0 ** -10, H - 2.0 ** -10])
    targets_w = np.array([-1.0, W, W - 1.0, 0.0, -0.5, W - 0.5, -1.0 + 2.0 ** -10, W - 2.0 ** -10])
    # Every 4th tap gets an exact h target, the next one an exact w target, cycling through the target lists;
    # every 8th lands exactly on a random in-map pixel centre.
    c = 0
    for b in range(B):
        for oh in range(Ho):
            for ow in range(Wo):
                for t in range(K):
                    i, j = divmod(t, k)
                    if c % 4 == 0:
                        off[b, oh, ow, t, 0] = targets_h[(c // 4) % len(targets_h)] - base_h[oh, i]
                    elif c % 4 == 1:
                        off[b, oh, ow, t, 1] = targets_w[(c // 4) % len(targets_w)] - base_w[ow, j]
                    elif c % 8 == 2:  # exactly on a pixel centre (border rows/cols included)
                        off[b, oh, ow, t, 0] = rng.integers(0, H) - base_h[oh, i]
                        off[b, oh, ow, t, 1] = rng.integers(0, W) - base_w[ow, j]
                    c += 1
    return off.reshape(B, Ho, Wo, 2 * K)


CASES = [
    # (B, H, W, Cin, Cout, k, s, p)
    (2, 7, 10, 3, 5, 2, 2, 0),  # LIT DTM geometry, non-square
    (2, 7, 10, 3, 5, 3, 1, 1),
    (1, 9, 6, 4, 2, 3, 2, 1),
    (1, 8, 5, 2, 3, 2, 2, 0),  # even H, odd W
]


IMPLS = ["padded", "masked"]  # the default gather and the previous formulation (deform_conv2d's impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,H,W,Cin,Cout,k,s,p", CASES)
def test_matches_numpy_loop(B, H, W, Cin, Cout, k, s, p, impl):
    rng = np.random.default_rng(B * 1000 + H * 100 + W * 10 + k)
    Ho, Wo = _out_hw(H, W, k, s, p)
    x = rng.standard_normal((B, H, W, Cin)).astype(np.float32)
    kernel = rng.standard_normal((k, k, Cin, Cout)).astype(np.float32)
    bias = rng.standard_normal((Cout,)).astype(np.float32)
    off = _make_offsets(rng, B, Ho, Wo, k, s, p, H, W, scale=max(H, W) / 3)

    # Coverage of the interesting regimes.
    offr = off.reshape(B, Ho, Wo, k * k, 2)
    hs = (np.arange(Ho)[:, None] * s - p + np.repeat(np.arange(k), k)[None, :])[None, :, None, :] + offr[..., 0]
    ws = (np.arange(Wo)[:, None] * s - p + np.tile(np.arange(k), k)[None, :])[None, None, :, :] + offr[..., 1]
    valid = (hs > -1) & (hs < H) & (ws > -1) & (ws < W)
    assert 0.2 < valid.mean() < 0.9
    assert ((hs == -1) | (hs == H)).any() and ((ws == -1) | (ws == W)).any()
    assert (valid & (hs == np.round(hs)) & (ws == np.round(ws))).any()

    fn = jax.jit(functools.partial(deform_conv2d, stride=(s, s), padding=(p, p), impl=impl))
    got = np.asarray(fn(x, off, kernel, bias))
    ref = _ref_deform_conv(x, off, kernel, bias, (s, s), (p, p))
    assert got.shape == ref.shape == (B, Ho, Wo, Cout) and got.dtype == np.float32
    err = np.abs(got - ref).max()
    assert err <= 1e-5 * np.abs(ref).max(), err

    # Without bias, int stride/padding spelling.
    got_nb = np.asarray(deform_conv2d(x, off, kernel, None, stride=s, padding=p, impl=impl))
    np.testing.assert_allclose(got_nb, got - bias, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("B,H,W,Cin,Cout,k,s,p", CASES)
def test_zero_offsets_is_plain_conv(B, H, W, Cin, Cout, k, s, p):
    rng = np.random.default_rng(7)
    Ho, Wo = _out_hw(H, W, k, s, p)
    x = rng.standard_normal((B, H, W, Cin)).astype(np.float32)
    kernel = rng.standard_normal((k, k, Cin, Cout)).astype(np.float32)
    bias = rng.standard_normal((Cout,)).astype(np.float32)
    got = np.asarray(deform_conv2d(x, np.zeros((B, Ho, Wo, 2 * k * k), np.float32), kernel, bias, (s, s), (p, p)))
    ref = jax.lax.conv_general_dilated(
        jnp.asarray(x), jnp.asarray(kernel), window_strides=(s, s), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST) + bias
    ref = np.asarray(ref)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_offset_channel_order_dy_then_dx():
    """1x1 kernel, identity weights: offset (dy=0.5, dx=0) averages vertically, (0, 0.5) horizontally."""
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1)
    kern = np.ones((1, 1, 1, 1), np.float32)
    off = np.zeros((1, 3, 4, 2), np.float32)
    off[..., 0] = 0.5
    y = np.asarray(deform_conv2d(x, off, kern))[0, :, :, 0]
    exp = np.array([[2, 3, 4, 5], [6, 7, 8, 9], [4, 4.5, 5, 5.5]], np.float32)  # last row: lower corner is 0
    np.testing.assert_allclose(y, exp, atol=1e-6)
    off = off[..., ::-1].copy()
    y = np.asarray(deform_conv2d(x, off, kern))[0, :, :, 0]
    exp = np.array([[0.5, 1.5, 2.5, 1.5], [4.5, 5.5, 6.5, 3.5], [8.5, 9.5, 10.5, 5.5]], np.float32)
    np.testing.assert_allclose(y, exp, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_offsets_give_bias(impl):
    x = np.ones((1, 4, 5, 2), np.float32)
    kern = np.ones((2, 2, 2, 3), np.float32)
    bias = np.array([1.0, -2.0, 3.0], np.float32)
    off = np.full((1, 2, 2, 8), 1e9, np.float32)
    off[..., ::2] = -1e9
    y = np.asarray(deform_conv2d(x, off, kern, bias, stride=2, impl=impl))
    np.testing.assert_array_equal(y, np.broadcast_to(bias, y.shape))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_finite_differences(impl):
    """jax.grad of <out, g> w.r.t. x, offsets, kernel, bias vs central differences of the float64 numpy loop."""
    rng = np.random.default_rng(3)
    B, H, W, Cin, Cout, k, s, p = 1, 5, 6, 2, 3, 2, 1, 1
    Ho, Wo = _out_hw(H, W, k, s, p)
    x = rng.standard_normal((B, H, W, Cin)).astype(np.float32)
    kernel = rng.standard_normal((k, k, Cin, Cout)).astype(np.float32)
    bias = rng.standard_normal((Cout,)).astype(np.float32)
    # Fractional parts kept in [0.1, 0.9] so no sample sits near a kink (integer coordinate) of the bilinear map;
    # integer parts spread so some taps are out of the map (zero gradient) and some partially outside.
    off = (rng.integers(-3, 3, (B, Ho, Wo, 2 * k * k)) + rng.uniform(0.1, 0.9, (B, Ho, Wo, 2 * k * k)))
    off = off.astype(np.float32)
    g = rng.standard_normal((B, Ho, Wo, Cout))

    args = dict(x=x, offsets=off, kernel=kernel, bias=bias)

    def loss_jax(a):
        out = deform_conv2d(a["x"], a["offsets"], a["kernel"], a["bias"], stride=s, padding=p, impl=impl)
        return jnp.sum(out * jnp.asarray(g, jnp.float32))

    grads = jax.jit(jax.grad(loss_jax))({n: jnp.asarray(v) for n, v in args.items()})
    for n in args:
        assert np.all(np.isfinite(np.asarray(grads[n])))

    def loss_ref(a):
        return np.sum(_ref_deform_conv(a["x"], a["offsets"], a["kernel"], a["bias"], (s, s), (p, p),
                                       f32_coords=False) * g)

    base = {n: np.asarray(v, np.float64) for n, v in args.items()}
    eps = 1e-4
    for n in args:
        for _ in range(3):
            v = rng.standard_normal(base[n].shape)
            plus = dict(base, **{n: base[n] + eps * v})
            minus = dict(base, **{n: base[n] - eps * v})
            fd = (loss_ref(plus) - loss_ref(minus)) / (2 * eps)
            an = float(np.sum(np.asarray(grads[n], np.float64) * v))
            assert abs(an - fd) <= 1e-4 * max(1.0, abs(fd)), (n, an, fd)
    # The offset gradient is non-trivial (some taps in, some out of the map).
    go = np.asarray(grads["offsets"])
    assert (go == 0).any() and (np.abs(go) > 1e-3).mean() > 0.3


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="unknown deform_conv2d impl 'fast'"):
        deform_conv2d(np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 2, 2, 8), np.float32),
                      np.zeros((2, 2, 1, 1), np.float32), stride=2, impl="fast")
