"""lit_jax.ops.anchors against a torch reimplementation of mmdet 2.11 AnchorGenerator (v2)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import torch

from lit_jax.ops.anchors import (base_anchors, feature_sizes, grid_anchors, multilevel_anchors,
                                 multilevel_valid_flags, retinanet_anchor_config, rpn_anchor_config,
                                 valid_flags)


def ref_level_anchors(stride, scales_f64, ratios, feat_hw):
    """mmdet: torch fp32, scale-major, centre offset 0, shifts x fastest."""
    scales = torch.Tensor(np.asarray(scales_f64))
    ratios = torch.Tensor(list(ratios))
    w = h = stride
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w * w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h * h_ratios[:, None] * scales[None, :]).view(-1)
    base = torch.stack([0.0 - 0.5 * ws, 0.0 - 0.5 * hs, 0.0 + 0.5 * ws, 0.0 + 0.5 * hs], dim=-1)
    fh, fw = feat_hw
    sx = torch.arange(0, fw) * stride
    sy = torch.arange(0, fh) * stride
    xx = sx.repeat(len(sy))
    yy = sy.view(-1, 1).repeat(1, len(sx)).view(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).type_as(base)
    return base, (base[None, :, :] + shifts[:, None, :]).view(-1, 4).numpy()


def ref_valid(feat_hw, pad_hw, stride, a):
    fh, fw = feat_hw
    vh = min(int(np.ceil(pad_hw[0] / stride)), fh)
    vw = min(int(np.ceil(pad_hw[1] / stride)), fw)
    vx = torch.zeros(fw, dtype=torch.bool)
    vy = torch.zeros(fh, dtype=torch.bool)
    vx[:vw] = 1
    vy[:vh] = 1
    v = vx.repeat(len(vy)) & vy.view(-1, 1).repeat(1, len(vx)).view(-1)
    return v[:, None].expand(v.size(0), a).contiguous().view(-1).numpy()


def test_retinanet_base_anchor_half_sizes_by_hand():
    cfg = retinanet_anchor_config()
    np.testing.assert_allclose(cfg.scales, [4.0, 5.0396842, 6.3496042], rtol=1e-7)
    b = base_anchors(8, cfg.scales, cfg.ratios)
    assert b.shape == (9, 4) and b.dtype == np.float32
    half_w, half_h = b[:, 2], b[:, 3]
    # index ratio_i * 3 + scale_i; spec §3 values
    np.testing.assert_allclose([half_w[0], half_h[0]], [22.627, 11.314], atol=1e-3)  # r=0.5, s=4
    np.testing.assert_allclose([half_w[1], half_h[1]], [28.509, 14.254], atol=1e-3)
    np.testing.assert_allclose([half_w[2], half_h[2]], [35.919, 17.959], atol=1e-3)
    np.testing.assert_allclose(half_w[3:6], [16.0, 20.159, 25.398], atol=1e-3)  # r=1
    np.testing.assert_allclose(half_h[3:6], [16.0, 20.159, 25.398], atol=1e-3)
    np.testing.assert_allclose(half_w[6:9], half_h[0:3], rtol=1e-6)  # r=2: transposes of r=0.5
    np.testing.assert_array_equal(b[:, :2], -b[:, 2:])  # centred on the corner (0, 0)
    np.testing.assert_allclose(half_w[0], 8 * 4 / math.sqrt(0.5) / 2, rtol=1e-6)  # by hand


def test_multilevel_anchors_800x1216():
    hw = (800, 1216)
    for cfg, a in [(retinanet_anchor_config(), 9), (rpn_anchor_config(), 3)]:
        levels = multilevel_anchors(hw, **cfg._asdict())
        fhws = feature_sizes(hw, cfg.strides)
        for stride, fhw, anc in zip(cfg.strides, fhws, levels):
            assert fhw == (math.ceil(800 / stride), math.ceil(1216 / stride))
            assert anc.shape == (fhw[0] * fhw[1] * a, 4)
            base, want = ref_level_anchors(stride, cfg.scales, cfg.ratios, fhw)
            np.testing.assert_array_equal(anc, want)  # bit-exact fp32
            np.testing.assert_array_equal(anc[:a], base.numpy())  # first cell = base anchors
            # last anchor: cell (H-1, W-1), last base anchor (ratio 2, largest scale)
            last = base.numpy()[-1] + np.float32([(fhw[1] - 1) * stride, (fhw[0] - 1) * stride] * 2)
            np.testing.assert_array_equal(anc[-1], last)
    # RetinaNet counts: 100x152, 50x76, 25x38, 13x19, 7x10 cells (ceil for the stride-64/128 levels)
    counts = [x.shape[0] for x in multilevel_anchors(hw, **retinanet_anchor_config()._asdict())]
    assert counts == [9 * 15200, 9 * 3800, 9 * 950, 9 * 247, 9 * 70]
    counts = [x.shape[0] for x in multilevel_anchors(hw, **rpn_anchor_config()._asdict())]
    assert counts == [3 * 60800, 3 * 15200, 3 * 3800, 3 * 950, 3 * 247]


def test_grid_order_x_fastest():
    base = np.float32([[-1, -1, 1, 1], [-2, -1, 2, 1]])
    g = grid_anchors((2, 3), 10, base)
    # row (y * W + x) * A + a
    np.testing.assert_array_equal(g[(1 * 3 + 2) * 2 + 1], [18, 9, 22, 11])
    np.testing.assert_array_equal(g[(0 * 3 + 1) * 2 + 0], [9, -1, 11, 1])


def test_valid_flags_per_image_pad():
    canvas = (800, 1344)
    cfg = retinanet_anchor_config()
    fhws = feature_sizes(canvas, cfg.strides)
    for pad in [(800, 1344), (800, 1216), (608, 1344), (768, 1088), (96, 64)]:
        got = multilevel_valid_flags(fhws, pad, cfg.strides, 9)
        jit_got = jax.jit(lambda p: multilevel_valid_flags(fhws, p, cfg.strides, 9))(jnp.array(pad))
        for s, fhw, g, jg in zip(cfg.strides, fhws, got, jit_got):
            want = ref_valid(fhw, pad, s, 9)
            np.testing.assert_array_equal(np.asarray(g), want)
            np.testing.assert_array_equal(np.asarray(jg), want)
    # ceil: pad 768 at stride 128 -> 6 valid rows of 7
    v = np.asarray(valid_flags((7, 11), (768, 1088), 128, 1)).reshape(7, 11)
    assert v[:6, :9].all() and not v[6].any() and not v[:, 9:].any()
