"""Parity of lit_jax.ops.interpolate with torch.nn.functional.interpolate (align_corners=False, no antialias)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_jax.ops import bicubic_weights, bilinear_weights, resize_bicubic, resize_bilinear

# (in, out) pairs used per axis: odd sizes, up, down, the LIT-S table sizes (99->95, 99->167, 27->99, 13->49),
# LIT-Ti pos-embed sizes (56->24, 7->3), degenerate 1->5, 5->1, and same size.
PAIRS_1D = [
    (99, 95), (99, 167), (27, 99), (13, 49), (56, 24), (7, 3), (1, 5), (5, 1), (8, 8), (14, 14), (2, 3), (3, 2),
    (10, 4), (4, 10), (28, 17), (17, 28),
]
# Non-square 2-D cases: ((in_h, in_w), (out_h, out_w)).
PAIRS_2D = [
    ((99, 99), (95, 167)),  # 640x360 -> LIT-S layers.2 table (downsample y, upsample x)
    ((49, 49), (47, 83)),
    ((56, 56), (24, 42)),
    ((56, 56), (100, 167)),
    ((28, 28), (13, 21)),
    ((7, 7), (3, 5)),
    ((13, 27), (49, 11)),
    ((1, 6), (5, 1)),
    ((9, 11), (9, 11)),
]
MODES = {"bilinear": (resize_bilinear, bilinear_weights), "bicubic": (resize_bicubic, bicubic_weights)}


def _torch_resize(x_nhwc: np.ndarray, size, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    y = F.interpolate(t, size=tuple(size), mode=mode, align_corners=False)
    return y.numpy().transpose(0, 2, 3, 1)


def _torch_weights(in_size: int, out_size: int, mode: str, dtype=torch.float64) -> np.ndarray:
    """torch's (out, in) interpolation matrix: resize an identity matrix along H only (W kept, whose weights are I)."""
    eye = torch.eye(in_size, dtype=dtype)[None, None]
    y = F.interpolate(eye, size=(out_size, in_size), mode=mode, align_corners=False)
    return y[0, 0].double().numpy()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("in_size,out_size", PAIRS_1D)
def test_weights_match_torch(mode, in_size, out_size):
    _, wfn = MODES[mode]
    # float64 tensors: torch computes the source index in float64.
    w64 = wfn(in_size, out_size, coord_dtype=np.float64)
    assert w64.shape == (out_size, in_size) and w64.dtype == np.float64
    np.testing.assert_allclose(w64, _torch_weights(in_size, out_size, mode, torch.float64), rtol=0, atol=1e-12)
    np.testing.assert_allclose(w64.sum(1), 1.0, atol=1e-12)  # both kernels are partitions of unity
    # float32 tensors (the default, what the fp32 reference runs): source index rounded to float32 like torch.
    w32 = wfn(in_size, out_size)
    assert w32.shape == (out_size, in_size) and w32.dtype == np.float64
    ref32 = _torch_weights(in_size, out_size, mode, torch.float32)
    # bilinear: bit-exact; bicubic: the cubic coefficients are evaluated in float64 here, float32 in torch.
    atol = 0.0 if mode == "bilinear" else 1e-6
    np.testing.assert_allclose(w32, ref32, rtol=0, atol=atol)
    # The two precisions differ only by the fp32 rounding of the source coordinate.
    assert np.abs(w32 - w64).max() <= 2.5e-7 * max(in_size, out_size)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n", [1, 2, 7, 56, 99])
def test_same_size_is_identity(mode, n):
    resize, wfn = MODES[mode]
    np.testing.assert_array_equal(wfn(n, n), np.eye(n))
    x = np.random.default_rng(n).standard_normal((2, n, n + 1, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(resize(x, (n, n + 1))), x)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("in_size,out_size", PAIRS_1D)
def test_resize_matches_torch_axiswise(mode, in_size, out_size):
    resize, _ = MODES[mode]
    rng = np.random.default_rng(1000 * in_size + out_size)
    # Vary one axis at a time (the other is kept fixed at a different size to catch axis mix-ups).
    x = rng.standard_normal((1, in_size, 6, 2)).astype(np.float32)
    for xin, size in ((x, (out_size, 6)), (x.transpose(0, 2, 1, 3).copy(), (6, out_size))):
        got = np.asarray(resize(xin, size))
        ref = _torch_resize(xin, size, mode)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("in_hw,out_hw", PAIRS_2D)
def test_resize_matches_torch_2d(mode, in_hw, out_hw):
    resize, _ = MODES[mode]
    rng = np.random.default_rng(sum(in_hw) * 7 + sum(out_hw))
    x = rng.standard_normal((2, *in_hw, 3)).astype(np.float32)
    got = np.asarray(jax.jit(resize, static_argnums=1)(x, out_hw))
    ref = _torch_resize(x, out_hw, mode)
    assert got.shape == ref.shape == (2, *out_hw, 3)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_leading_dims_and_dtype():
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 13, 4)).astype(np.float32)
    y = resize_bicubic(jnp.asarray(x, jnp.bfloat16), (5, 17))
    assert y.shape == (2, 3, 5, 17, 4) and y.dtype == jnp.bfloat16
    y32 = resize_bilinear(x, (5, 17))
    ref = _torch_resize(x.reshape(6, 9, 13, 4), (5, 17), "bilinear").reshape(2, 3, 5, 17, 4)
    assert np.abs(np.asarray(y32) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_jax_image_resize_cubic_is_not_torch_bicubic():
    """Do NOT 'simplify' resize_bicubic to jax.image.resize: Keys a=-0.5 + edge renormalisation (+ antialias)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 99, 99, 2)).astype(np.float32)
    ref = _torch_resize(x, (95, 167), "bicubic")
    for antialias in (True, False):
        j = np.asarray(jax.image.resize(x, (1, 95, 167, 2), method="cubic", antialias=antialias))
        assert np.abs(j - ref).max() > 1e-2 * np.abs(ref).max()
    # Even pure upsampling (no antialias involved) differs: the kernel coefficient is different.
    x = rng.standard_normal((1, 27, 27, 2)).astype(np.float32)
    j = np.asarray(jax.image.resize(x, (1, 99, 99, 2), method="cubic", antialias=False))
    assert np.abs(j - _torch_resize(x, (99, 99), "bicubic")).max() > 1e-2


def test_jax_image_resize_linear_antialias():
    """jax 'linear' equals torch bilinear only with antialias=False; the default antialias differs when downsampling."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 56, 56, 2)).astype(np.float32)
    for out_hw in ((24, 42), (100, 167), (3, 5)):
        ref = _torch_resize(x, out_hw, "bilinear")
        j = np.asarray(jax.image.resize(x, (1, *out_hw, 2), method="linear", antialias=False))
        assert np.abs(j - ref).max() <= 1e-5 * np.abs(ref).max()
    ref = _torch_resize(x, (24, 42), "bilinear")
    j = np.asarray(jax.image.resize(x, (1, 24, 42, 2), method="linear"))
    assert np.abs(j - ref).max() > 1e-2
