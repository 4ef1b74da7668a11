"""Checks of the PyTorch LIT reference in third_party/lit_torch (parity spec sections 12 and 13)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from third_party.lit_torch import (
    DeformConv2dPack,
    LITSCls,
    LITSDet,
    LITTiCls,
    LITTiDet,
    count_params,
    deform_conv2d_torch,
    perturb_offsets_,
    randomize_,
    relative_position_index,
    resize_rel_pos_table,
    save_random_checkpoint,
)
from third_party.lit_torch import save_random as save_random_mod

torch.set_num_threads(1)

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------------------------------------------
# Expected checkpoint layouts, written out from the spec's "Checkpoint keys" lists.
def _ln(prefix, d):
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def _lin(prefix, o, i):
    return {f"{prefix}.weight": (o, i), f"{prefix}.bias": (o,)}


def _bn(prefix, d):
    return {**_ln(prefix, d), f"{prefix}.running_mean": (d,), f"{prefix}.running_var": (d,),
            f"{prefix}.num_batches_tracked": ()}


def _dtm(prefix, ci, co):
    return {f"{prefix}.dconv.weight": (co, ci, 2, 2), f"{prefix}.dconv.bias": (co,),
            f"{prefix}.dconv.conv_offset.weight": (8, ci, 2, 2), f"{prefix}.dconv.conv_offset.bias": (8,),
            **_bn(f"{prefix}.norm_layer", co)}


def _mlp_block(prefix, d, ratio):
    return {**_ln(f"{prefix}.norm2", d), **_lin(f"{prefix}.mlp.fc1", ratio * d, d),
            **_lin(f"{prefix}.mlp.fc2", d, ratio * d)}


def _attn_block(prefix, d, ratio, table=None):
    out = {**_ln(f"{prefix}.norm1", d), **_lin(f"{prefix}.attn.qkv", 3 * d, d),
           **_lin(f"{prefix}.attn.proj", d, d), **_mlp_block(prefix, d, ratio)}
    if table is not None:
        out[f"{prefix}.attn.relative_position_bias_table"] = table
    return out


def expected_ti_det():
    e = {"patch_embed1.proj.weight": (64, 3, 4, 4), "patch_embed1.proj.bias": (64,), **_ln("patch_embed1.norm", 64),
         **_dtm("patch_embed2", 64, 128), **_dtm("patch_embed3", 128, 320), **_dtm("patch_embed4", 320, 512),
         "pos_embed1": (1, 3136, 64), "pos_embed2": (1, 784, 128), "pos_embed3": (1, 196, 320),
         "pos_embed4": (1, 50, 512)}
    for i in range(3):
        e.update(_mlp_block(f"block1.{i}", 64, 8))
    for i in range(4):
        e.update(_mlp_block(f"block2.{i}", 128, 8))
    for i in range(6):
        e.update(_attn_block(f"block3.{i}", 320, 4))
    for i in range(3):
        e.update(_attn_block(f"block4.{i}", 512, 4))
    return e


def expected_ti_cls():
    return {**expected_ti_det(), "cls_token": (1, 1, 512), **_ln("norm", 512), **_lin("head", 1000, 512)}


def expected_s(cls=False):
    R = (14, 7) if cls else (50, 25)
    e = {"patch_embed.proj.weight": (96, 3, 4, 4), "patch_embed.proj.bias": (96,), **_ln("patch_embed.norm", 96)}
    for li, d in ((0, 96), (1, 192)):
        for b in range(2):
            e.update(_mlp_block(f"layers.{li}.blocks.{b}", d, 4))
    for li, d, heads, depth, r, hw in ((2, 384, 12, 6, R[0], 14 * 14), (3, 768, 24, 2, R[1], 7 * 7)):
        for b in range(depth):
            e.update(_attn_block(f"layers.{li}.blocks.{b}", d, 4, table=((2 * r - 1) ** 2, heads)))
            if cls:
                e[f"layers.{li}.blocks.{b}.attn.relative_position_index"] = (hw, hw)
    for li, d in ((0, 96), (1, 192), (2, 384)):
        e.update(_dtm(f"layers.{li}.downsample", d, 2 * d))
    if cls:
        e.update({**_ln("norm", 768), **_lin("head", 1000, 768)})
    else:
        e.update({**_ln("norm1", 192), **_ln("norm2", 384), **_ln("norm3", 768)})
    return e


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"ti_det": LITTiDet().eval(), "ti_cls": LITTiCls().eval(), "s_det": LITSDet().eval(),
            "s_cls": LITSCls().eval()}


@pytest.mark.parametrize("name,count", [("ti_det", 19_371_736), ("ti_cls", 19_886_272),
                                        ("s_det", 27_966_192), ("s_cls", 27_973_720)])
def test_param_counts(models, name, count):
    m = models[name]
    assert count_params(m) == count
    assert sum(p.numel() for p in m.parameters()) == count
    # spec 13: sum over the state_dict without the BN buffers (+ S-cls's non-trainable relative_position_index)
    sd = m.state_dict()
    n = sum(v.numel() for k, v in sd.items() if not k.endswith(_BN_BUFFERS) and "relative_position_index" not in k)
    assert n == count


@pytest.mark.parametrize("name,expected", [("ti_det", expected_ti_det), ("ti_cls", expected_ti_cls),
                                           ("s_det", lambda: expected_s(False)), ("s_cls", lambda: expected_s(True))])
def test_state_dict_layout(models, name, expected):
    got = _shapes(models[name])
    exp = expected()
    assert set(got) - set(exp) == set(), "unexpected keys"
    assert set(exp) - set(got) == set(), "missing keys"
    assert got == exp


def test_relative_position_index_buffer_is_persistent_int64(models):
    idx = models["s_cls"].state_dict()["layers.2.blocks.0.attn.relative_position_index"]
    assert idx.dtype == torch.int64
    assert torch.equal(idx, relative_position_index(14, 14))


# ----------------------------------------------------------------------------------------------------------------
# Deformable convolution
def _naive_dcn(x, offset, weight, bias, stride, pad):
    """Scalar-loop DCNv1 written straight from the mmcv rules (float64)."""
    x = x.double().numpy()
    offset = offset.double().numpy()
    weight = weight.double().numpy()
    B, C, H, W = x.shape
    Co, _, kh, kw = weight.shape
    Ho, Wo = offset.shape[2], offset.shape[3]
    out = np.zeros((B, Co, Ho, Wo))

    def px(b, c, h, w):
        return x[b, c, h, w] if (0 <= h <= H - 1 and 0 <= w <= W - 1) else 0.0

    for b in range(B):
        for ho in range(Ho):
            for wo in range(Wo):
                col = np.zeros((C, kh, kw))
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        h = ho * stride - pad + i + offset[b, 2 * k, ho, wo]
                        w = wo * stride - pad + j + offset[b, 2 * k + 1, ho, wo]
                        if not (-1 < h < H and -1 < w < W):
                            continue
                        h0, w0 = math.floor(h), math.floor(w)
                        lh, lw = h - h0, w - w0
                        for c in range(C):
                            col[c, i, j] = ((1 - lh) * (1 - lw) * px(b, c, h0, w0) + (1 - lh) * lw * px(b, c, h0, w0 + 1)
                                            + lh * (1 - lw) * px(b, c, h0 + 1, w0) + lh * lw * px(b, c, h0 + 1, w0 + 1))
                out[b, :, ho, wo] = np.tensordot(weight, col, axes=([1, 2, 3], [0, 1, 2]))
    if bias is not None:
        out += bias.double().numpy()[None, :, None, None]
    return out


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_dcn_zero_offset_is_conv(k, s, p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 12, generator=g)
    w = torch.randn(7, 5, k, k, generator=g)
    b = torch.randn(7, generator=g)
    ref = F.conv2d(x, w, b, stride=s, padding=p)
    off = torch.zeros(2, 2 * k * k, ref.shape[2], ref.shape[3])
    out = deform_conv2d_torch(x, off, w, b, stride=s, padding=p)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dcn_pack_init_is_strided_conv():
    torch.manual_seed(0)
    m = DeformConv2dPack(6, 10, kernel_size=2, stride=2, padding=0)
    assert torch.count_nonzero(m.conv_offset.weight) == 0 and torch.count_nonzero(m.conv_offset.bias) == 0
    assert tuple(m.conv_offset.weight.shape) == (8, 6, 2, 2)
    x = torch.randn(1, 6, 8, 10)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, stride=2), rtol=1e-5, atol=1e-5)


def _one_tap(offset_channel_values, tap=(0, 0)):
    """3x4 map with distinct rows, a 2x2/s2 DCN whose only nonzero weight is `tap`; returns (x, out[0,0,0,0])."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [100.0, 200.0, 300.0, 400.0]]).view(1, 1, 3, 4)
    w = torch.zeros(1, 1, 2, 2)
    w[0, 0, tap[0], tap[1]] = 1.0
    off = torch.zeros(1, 8, 1, 2)
    for ch, v in offset_channel_values.items():
        off[0, ch, 0, 0] = v
    return x, deform_conv2d_torch(x, off, w, None, stride=2, padding=0)[0, 0, 0, 0].item()


def test_dcn_boundary_rules():
    # tap (0,0) samples (0 + dy, 0 + dx); channel 0 = dy, channel 1 = dx
    assert _one_tap({0: -1.0})[1] == 0.0                      # h = -1 exactly: outside the (-1, H) window
    assert _one_tap({0: -0.5})[1] == pytest.approx(0.5)      # h = -0.5: half of row 0 (x[0,0] = 1)
    assert _one_tap({1: -0.5})[1] == pytest.approx(0.5)      # w = -0.5: half of column 0
    assert _one_tap({1: -1.0})[1] == 0.0                      # w = -1 exactly
    assert _one_tap({0: -0.5, 1: -0.5})[1] == pytest.approx(0.25)
    assert _one_tap({0: 0.25})[1] == pytest.approx(0.75 * 1 + 0.25 * 10)   # dy moves along rows
    assert _one_tap({1: 0.25})[1] == pytest.approx(0.75 * 1 + 0.25 * 2)    # dx moves along columns
    assert _one_tap({0: 2.5})[1] == pytest.approx(50.0)      # h = 2.5 = H - 0.5: half of the last row (100)
    assert _one_tap({0: 3.0})[1] == 0.0                       # h = H exactly
    assert _one_tap({1: 3.5})[1] == pytest.approx(0.5 * 4)   # w = W - 0.5
    assert _one_tap({0: -7.3, 1: 1.0})[1] == 0.0
    # tap (1,0) is k = 2 -> channels 4 (dy) and 5 (dx); base point (1, 0)
    assert _one_tap({4: 0.5}, tap=(1, 0))[1] == pytest.approx(0.5 * 10 + 0.5 * 100)
    assert _one_tap({5: 1.0}, tap=(1, 0))[1] == pytest.approx(20.0)
    assert _one_tap({0: 5.0, 1: 5.0}, tap=(1, 0))[1] == pytest.approx(10.0)  # other taps' offsets don't leak
    # tap (0,1) is k = 1 -> channels 2 (dy) and 3 (dx); base point (0, 1)
    assert _one_tap({3: -1.5}, tap=(0, 1))[1] == pytest.approx(0.5 * 1)       # w = -0.5


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1)])
def test_dcn_matches_scalar_reference(k, s, p):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 7, generator=g)
    w = torch.randn(4, 3, k, k, generator=g)
    b = torch.randn(4, generator=g)
    Ho, Wo = (6 + 2 * p - k) // s + 1, (7 + 2 * p - k) // s + 1
    off = 2.0 * torch.randn(2, 2 * k * k, Ho, Wo, generator=g)
    off[0, 0, 0, 0] = -1.0          # exact boundary hits
    off[1, 1, 0, 0] = -0.5
    off[1, 0, -1, -1] = 10.0        # far outside
    out = deform_conv2d_torch(x, off, w, b, stride=s, padding=p)
    np.testing.assert_allclose(out.numpy(), _naive_dcn(x, off, w, b, s, p), rtol=1e-5, atol=1e-5)


def test_dcn_backward_reaches_offsets():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 4, 4, generator=g, requires_grad=True)
    off = (0.3 * torch.randn(1, 8, 2, 2, generator=g)).requires_grad_()
    w = torch.randn(3, 2, 2, 2, generator=g, requires_grad=True)
    deform_conv2d_torch(x, off, w, None, 2, 0).sum().backward()
    assert x.grad is not None and off.grad is not None and w.grad is not None
    assert torch.count_nonzero(off.grad) > 0


def test_perturb_offsets_is_seeded_and_nonzero():
    a = perturb_offsets_(DeformConv2dPack(4, 8), scale=1.0, seed=3)
    b = perturb_offsets_(DeformConv2dPack(4, 8), scale=1.0, seed=3)
    assert torch.count_nonzero(a.conv_offset.weight) > 0
    torch.testing.assert_close(a.conv_offset.weight, b.conv_offset.weight)
    torch.testing.assert_close(a.conv_offset.bias, b.conv_offset.bias)


# ----------------------------------------------------------------------------------------------------------------
# Whole backbones
@pytest.mark.parametrize("name,chans", [("ti_det", (64, 128, 320, 512)), ("s_det", (96, 192, 384, 768))])
def test_detection_output_shapes(name, chans):
    torch.manual_seed(0)
    model = (LITTiDet if name == "ti_det" else LITSDet)()
    randomize_(model, seed=1)
    perturb_offsets_(model, scale=1.0, seed=2)
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = model(x)
        outs2 = model(x)
    assert [tuple(o.shape) for o in outs] == [(2, c, 64 // s, 96 // s) for c, s in zip(chans, (4, 8, 16, 32))]
    for a, b in zip(outs, outs2):  # drop path is off in eval
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
    # batch independence (per-sample computation in eval)
    with torch.no_grad():
        single = model(x[1:2])
    for a, b in zip(outs, single):
        torch.testing.assert_close(a[1:2], b, rtol=1e-4, atol=1e-4)


def test_drop_path_schedule(models):
    ti = models["ti_det"]
    probs = [blk.drop_path.drop_prob for s in (1, 2, 3, 4) for blk in getattr(ti, f"block{s}")]
    np.testing.assert_allclose(probs, np.linspace(0, 0.1, 16), rtol=0, atol=1e-7)
    s = models["s_det"]
    probs = [blk.drop_path.drop_prob for layer in s.layers for blk in layer.blocks]
    np.testing.assert_allclose(probs, np.linspace(0, 0.2, 12), rtol=0, atol=1e-7)


def test_drop_path_active_in_train():
    torch.manual_seed(0)
    m = LITTiDet(drop_path_rate=0.9).train()
    x = torch.randn(4, 3, 32, 32)
    a = m(x)[-1]
    b = m(x)[-1]
    assert not torch.equal(a, b)


def test_ti_pos_embed_rule(models):
    m = models["ti_det"]
    # the stored embedding is reused (same tensor) exactly when H*W == 3136 ...
    assert m.get_pos_embed(1, 56, 56) is m.pos_embed1
    assert m.get_pos_embed(1, 49, 64) is m.pos_embed1        # ... even for a non-56x56 grid (the quirk)
    # ... otherwise bilinear (align_corners=False) from the square 56x56 source grid
    got = m.get_pos_embed(1, 16, 24)
    grid = m.pos_embed1.reshape(1, 56, 56, 64).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(16, 24), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert got.shape == (1, 384, 64)
    torch.testing.assert_close(got, ref)
    # same-size interpolation is the identity (224 input: stages 2-4 take the interpolation branch)
    torch.testing.assert_close(m.get_pos_embed(2, 28, 28), m.pos_embed2)
    torch.testing.assert_close(m.get_pos_embed(4, 7, 7), m.pos_embed4[:, 1:])
    # stage-4 source excludes the cls slot
    g4 = m.pos_embed4[:, 1:].reshape(1, 7, 7, 512).permute(0, 3, 1, 2)
    ref4 = F.interpolate(g4, size=(3, 5), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(m.get_pos_embed(4, 3, 5), ref4)
    # at stages 2-4 the as-is branch is the original's crash
    for stage in (2, 3, 4):
        with pytest.raises(RuntimeError):
            m.get_pos_embed(stage, 56, 56)


def test_ti_pos_embed_branch_in_forward(models, monkeypatch):
    m = models["ti_det"]
    calls = []
    orig = type(m).get_pos_embed

    def spy(self, stage, H, W):
        out = orig(self, stage, H, W)
        calls.append((stage, H * W, out is getattr(self, f"pos_embed{stage}")))
        return out

    monkeypatch.setattr(type(m), "get_pos_embed", spy)
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    assert calls == [(1, 3136, True), (2, 784, False), (3, 196, False), (4, 49, False)]
    calls.clear()
    with torch.no_grad():
        m(torch.randn(1, 3, 64, 96))
    assert calls == [(1, 384, False), (2, 96, False), (3, 24, False), (4, 6, False)]


def test_ti_cls_forward(models):
    m = models["ti_cls"]
    with torch.no_grad():
        y = m(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_s_relative_position_bias():
    idx = relative_position_index(3, 4)
    a, b = 1 * 4 + 3, 2 * 4 + 0            # a = (1, 3), b = (2, 0)
    assert idx[a, b].item() == (1 - 2 + 2) * 7 + (3 - 0 + 3)
    assert idx.min().item() == 0 and idx.max().item() == 5 * 7 - 1
    # same-size bicubic is the identity, so at 224 the ImageNet model indexes its table directly
    g = torch.Generator().manual_seed(0)
    table = torch.randn(27 * 27, 12, generator=g)
    torch.testing.assert_close(resize_rel_pos_table(table, 14, 14), table.t().reshape(12, 27, 27))
    # detection: (9801, 12) table -> (2H-1, 2W-1) bicubic; element [h, r, c] = table[r*(2R-1)+c, h]
    big = torch.randn(99 * 99, 12, generator=g)
    res = resize_rel_pos_table(big, 4, 6)
    ref = F.interpolate(big.t().reshape(1, 12, 99, 99), size=(7, 11), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(res, ref)
    from third_party.lit_torch.lit_s import RelPosAttention
    attn = RelPosAttention(384, 12, 50)
    attn.relative_position_bias_table.data.copy_(big)
    bias = attn.relative_position_bias(4, 6)
    idx = relative_position_index(4, 6)
    assert bias.shape == (12, 24, 24)
    torch.testing.assert_close(bias[5, 7, 13], res.reshape(12, -1)[5, idx[7, 13]])


def test_s_cls_forward(models):
    with torch.no_grad():
        y = models["s_cls"](torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_s_patch_embed_pads_to_multiple_of_4():
    torch.manual_seed(0)
    m = LITSDet().eval()
    x = torch.randn(1, 3, 62, 94)
    xp = F.pad(x, (0, 2, 0, 2))
    with torch.no_grad():
        a, b = m(x), m(xp)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


# ----------------------------------------------------------------------------------------------------------------
# Random checkpoints
def test_randomize_is_nontrivial_and_seeded():
    torch.manual_seed(0)
    a = randomize_(LITSDet(), seed=5)
    torch.manual_seed(0)
    b = randomize_(LITSDet(), seed=5)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    rv = sa["layers.0.downsample.norm_layer.running_var"]
    assert rv.min() >= 0.5 and rv.max() <= 2.0 and rv.std() > 0
    assert sa["norm1.weight"].std() > 0 and sa["layers.2.blocks.0.attn.relative_position_bias_table"].std() > 0.1


@pytest.mark.parametrize("model,variant,nest,prefix", [("lit_ti", "det", "state_dict", "backbone."),
                                                        ("lit_s", "cls", "model", ""),
                                                        ("lit_ti", "cls", None, "")])
def test_save_random_checkpoint_roundtrip(tmp_path, model, variant, nest, prefix):
    path = tmp_path / "ckpt.pth"
    m = save_random_checkpoint(model, str(path), seed=3, variant=variant, nest=nest, prefix=prefix)
    obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if nest == "state_dict":
        assert set(obj) == {"meta", "state_dict"}
        sd = obj["state_dict"]
    elif nest == "model":
        assert set(obj) == {"model"}
        sd = obj["model"]
    else:
        sd = obj
    assert all(k.startswith(prefix) for k in sd)
    ref = m.state_dict()
    assert set(k[len(prefix):] for k in sd) == set(ref)
    for k, v in ref.items():
        assert torch.equal(sd[prefix + k], v), k
    offs = [v for k, v in sd.items() if k.endswith("conv_offset.weight")]
    assert len(offs) == 3 and all(torch.count_nonzero(o) > 0 for o in offs)
    assert not m.training


def test_save_random_cli(tmp_path):
    out = tmp_path / "x.pth"
    save_random_mod.main(["--model", "lit_ti", "--out", str(out), "--nest", "state_dict", "--prefix", "backbone."])
    obj = torch.load(str(out), map_location="cpu", weights_only=False)
    assert "backbone.patch_embed1.proj.weight" in obj["state_dict"]
    assert obj["meta"]["mmdet_version"] == "2.11.0"
