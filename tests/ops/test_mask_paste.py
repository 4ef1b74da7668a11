"""lit_jax.ops.mask_paste against mmdet 2.11's _do_paste_mask (GPU path) written with torch ops + grid_sample."""
import jax
import numpy as np
import torch
import torch.nn.functional as F

from lit_jax.ops.mask_paste import paste_mask_probs, paste_masks


def ref_paste(masks, boxes, img_h, img_w):
    """mmdet 2.11 ``_do_paste_mask(masks, boxes, img_h, img_w, skip_empty=False)``; masks (N, m, m) -> (N, H, W)."""
    masks = torch.as_tensor(np.asarray(masks, np.float32))[:, None]
    boxes = torch.as_tensor(np.asarray(boxes, np.float32))
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)  # each N x 1
    n = masks.shape[0]
    img_y = torch.arange(0, img_h, dtype=torch.float32) + 0.5
    img_x = torch.arange(0, img_w, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    if torch.isinf(img_x).any():
        img_x[torch.where(torch.isinf(img_x))] = 0
    if torch.isinf(img_y).any():
        img_y[torch.where(torch.isinf(img_y))] = 0
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    return F.grid_sample(masks, grid, align_corners=False)[:, 0].numpy()


def _check(probs, boxes, hw, thr=0.5):
    ref = ref_paste(probs, boxes, *hw)
    got_p = np.asarray(paste_mask_probs(probs, boxes, hw))
    got = np.asarray(paste_masks(probs, boxes, hw, thr))
    assert got.shape == (len(boxes), *hw) and got.dtype == np.bool_
    np.testing.assert_allclose(got_p, ref, rtol=0, atol=2e-6)
    near = np.abs(ref - thr) <= 1e-6
    np.testing.assert_array_equal(got[~near], (ref >= thr)[~near])
    return got, ref


def _probs(rng, n, m=28):
    # Smooth blobs in [0, 1] plus noise, so the 0.5 contour crosses the box interior.
    yy, xx = np.meshgrid(np.linspace(-1, 1, m), np.linspace(-1, 1, m), indexing="ij")
    c = rng.uniform(-0.5, 0.5, (n, 2, 1, 1))
    p = 1.0 / (1.0 + np.exp(6 * ((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) - 2))
    return np.clip(p + 0.1 * rng.standard_normal((n, m, m)), 0, 1).astype(np.float32)


def test_paste_matches_grid_sample():
    rng = np.random.default_rng(0)
    hw = (37, 53)  # non-square
    boxes = np.array([
        [10.3, 5.2, 40.7, 30.1],    # inside
        [-12.0, -8.5, 20.0, 15.0],  # partly outside (top-left)
        [35.0, 20.0, 80.0, 60.0],   # partly outside (bottom-right)
        [0.0, 0.0, 53.0, 37.0],     # the whole image
        [-30.0, -30.0, 100.0, 90.0],  # larger than the image
        [22.4, 11.1, 22.9, 11.5],   # tiny (sub-pixel)
        [5.0, 3.0, 7.0, 4.0],       # small, integer
        [60.0, 40.0, 90.0, 70.0],   # fully outside
    ], np.float32)
    probs = _probs(rng, len(boxes))
    probs[6] = 0.9  # the small integer box fills its pixels
    got, ref = _check(probs, boxes, hw)
    assert got[0].any() and got[3].any() and got[6].sum() == 2 and not got[7].any()


def test_paste_degenerate_boxes():
    """Zero-width / zero-height boxes: +-inf grid values become 0, i.e. the mask's centre column/row (13.5)."""
    hw = (20, 30)
    boxes = np.array([
        [10.0, 4.0, 10.0, 12.0],  # zero width, integer x0: g_x = +-inf everywhere -> 0
        [10.0, 4.0, 10.0, 12.0],
        [5.0, 7.0, 15.0, 7.0],    # zero height
        [12.0, 3.0, 12.0, 3.0],   # zero width and height
    ], np.float32)
    probs = np.full((4, 28, 28), 0.3, np.float32)
    probs[1] = 0.9
    probs[2] = 0.9
    probs[3] = 0.9
    got, ref = _check(probs, boxes, hw)
    assert not got[0].any()  # no crash; low centre column -> all False
    # mmdet quirk reproduced: a zero-width box with a high centre column fills its rows across the whole image
    # (and a zero-height box its columns across the whole image height).
    np.testing.assert_array_equal(got[1], np.broadcast_to((np.arange(20) >= 4) & (np.arange(20) < 12), (30, 20)).T)
    np.testing.assert_array_equal(got[2], np.broadcast_to((np.arange(30) >= 5) & (np.arange(30) < 15), (20, 30)))
    assert got[3].all()  # both axes collapse to the centre: the whole image


def test_paste_nan_grid_column_is_zero():
    """Zero width at a half-integer x0: column x0 - 0.5 is 0/0 = NaN (not inf, so mmdet keeps it). torch's CPU
    grid_sample returns NaN there, CUDA 0 or NaN (depending on how floor(NaN) casts); either way the mask is False.
    We sample 0."""
    hw = (8, 10)
    boxes = np.array([[4.5, 1.0, 4.5, 6.0]], np.float32)
    probs = np.full((1, 28, 28), 0.9, np.float32)
    got = np.asarray(paste_masks(probs, boxes, hw))
    expect = np.zeros(hw, bool)
    expect[1:6, :] = True
    expect[:, 4] = False  # the NaN column
    np.testing.assert_array_equal(got[0], expect)
    ref = ref_paste(probs, boxes, *hw)[0]
    assert np.isnan(ref[:, 4]).all()
    np.testing.assert_array_equal(got[0], ref >= 0.5)
    assert np.all(np.asarray(paste_mask_probs(probs, boxes, hw))[0, :, 4] == 0)


def test_paste_jit_vmap_threshold():
    rng = np.random.default_rng(1)
    hw = (24, 17)
    probs = _probs(rng, 6)
    boxes = np.sort(rng.uniform(-5, 25, (6, 2, 2)), axis=1).reshape(6, 4)[:, [0, 2, 1, 3]].astype(np.float32)
    eager = np.asarray(paste_masks(probs, boxes, hw))
    jitted = np.asarray(jax.jit(lambda p, b, t: paste_masks(p, b, hw, t))(probs, boxes, 0.5))
    vm = np.asarray(jax.vmap(lambda p, b: paste_masks(p[None], b[None], hw)[0])(probs, boxes))
    np.testing.assert_array_equal(jitted, eager)
    np.testing.assert_array_equal(vm, eager)
    _check(probs, boxes, hw, thr=0.3)
