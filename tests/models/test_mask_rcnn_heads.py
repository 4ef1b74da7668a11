"""Mask R-CNN heads (RPNHead, Shared2FCBBoxHead, FCNMaskHead) against PyTorch layers with mmdet's keys.

The torch modules below are built with the state_dict keys and shapes of parity_spec.md §12 (``rpn_head.*``,
``roi_head.bbox_head.*``, ``roi_head.mask_head.*``); their weights go through ``convert_state_dict`` exactly as a
checkpoint would, and the outputs are compared on random inputs.
"""

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

import flax.linen as nn
import jax
import jax.numpy as jnp

from lit_jax.convert.mapping import convert_state_dict
from lit_jax.models.mask_rcnn_heads import ConvTranspose2d, FCNMaskHead, RPNHead, Shared2FCBBoxHead


# ---- PyTorch reference layers (mmdet 2.11 forward passes, mmdet key names) ------------------------------------
class TorchRPNHead(tnn.Module):
    def __init__(self, in_channels=256, feat_channels=256, num_anchors=3):
        super().__init__()
        self.rpn_conv = tnn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = tnn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = tnn.Conv2d(feat_channels, num_anchors * 4, 1)

    def forward(self, feats):
        cls, reg = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            b = x.shape[0]
            # RPNHead._get_bboxes / AnchorHead.loss layout.
            cls.append(self.rpn_cls(x).permute(0, 2, 3, 1).reshape(b, -1))
            reg.append(self.rpn_reg(x).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return cls, reg


class TorchShared2FCBBoxHead(tnn.Module):
    def __init__(self, in_channels=256, roi=7, fc_out=1024, num_classes=80):
        super().__init__()
        self.shared_fcs = tnn.ModuleList([tnn.Linear(in_channels * roi * roi, fc_out), tnn.Linear(fc_out, fc_out)])
        self.fc_cls = tnn.Linear(fc_out, num_classes + 1)
        self.fc_reg = tnn.Linear(fc_out, 4 * num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class TorchConvModule(tnn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


class TorchFCNMaskHead(tnn.Module):
    def __init__(self, in_channels=256, conv_out=256, num_classes=80, num_convs=4):
        super().__init__()
        self.convs = tnn.ModuleList([TorchConvModule(in_channels if i == 0 else conv_out, conv_out)
                                     for i in range(num_convs)])
        self.upsample = tnn.ConvTranspose2d(conv_out, conv_out, 2, stride=2)
        self.conv_logits = tnn.Conv2d(conv_out, num_classes, 1)

    def forward(self, x):
        for c in self.convs:
            x = c(x)
        return self.conv_logits(F.relu(self.upsample(x)))


class TorchRoIHead(tnn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.bbox_head = TorchShared2FCBBoxHead(**kw.get("bbox", {}))
        self.mask_head = TorchFCNMaskHead(**kw.get("mask", {}))


class TorchHeads(tnn.Module):
    """The head part of a Mask R-CNN state_dict: ``rpn_head.*``, ``roi_head.bbox_head.*``, ``roi_head.mask_head.*``."""

    def __init__(self, rpn=None, bbox=None, mask=None):
        super().__init__()
        self.rpn_head = TorchRPNHead(**(rpn or {}))
        self.roi_head = TorchRoIHead(bbox=bbox or {}, mask=mask or {})


# Spec §12 (Mask R-CNN heads), full size.
SPEC_SHAPES = {
    "rpn_head.rpn_conv.weight": (256, 256, 3, 3), "rpn_head.rpn_conv.bias": (256,),
    "rpn_head.rpn_cls.weight": (3, 256, 1, 1), "rpn_head.rpn_cls.bias": (3,),
    "rpn_head.rpn_reg.weight": (12, 256, 1, 1), "rpn_head.rpn_reg.bias": (12,),
    "roi_head.bbox_head.shared_fcs.0.weight": (1024, 12544), "roi_head.bbox_head.shared_fcs.0.bias": (1024,),
    "roi_head.bbox_head.shared_fcs.1.weight": (1024, 1024), "roi_head.bbox_head.shared_fcs.1.bias": (1024,),
    "roi_head.bbox_head.fc_cls.weight": (81, 1024), "roi_head.bbox_head.fc_cls.bias": (81,),
    "roi_head.bbox_head.fc_reg.weight": (320, 1024), "roi_head.bbox_head.fc_reg.bias": (320,),
    **{f"roi_head.mask_head.convs.{i}.conv.{p}": s for i in range(4)
       for p, s in (("weight", (256, 256, 3, 3)), ("bias", (256,)))},
    "roi_head.mask_head.upsample.weight": (256, 256, 2, 2), "roi_head.mask_head.upsample.bias": (256,),
    "roi_head.mask_head.conv_logits.weight": (80, 256, 1, 1), "roi_head.mask_head.conv_logits.bias": (80,),
}


@pytest.fixture(scope="module")
def torch_heads():
    torch.manual_seed(0)
    heads = TorchHeads().eval()
    with torch.no_grad():  # non-zero, non-symmetric biases too (torch's default init already randomises them)
        for name, p in heads.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return heads


def _state(module, prefix):
    return {k[len(prefix):]: v.detach().numpy() for k, v in module.state_dict().items() if k.startswith(prefix)}


def _convert(flax_module, sample, state_dict, prefix):
    """convert_state_dict with the full mmdet keys, routed to the head by stripping ``prefix``."""
    shapes = jax.eval_shape(lambda x: flax_module.init(jax.random.PRNGKey(0), x), sample)
    full = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    variables, report = convert_state_dict(full, shapes, source=prefix, rename=lambda k: k[len(prefix):])
    assert sorted(report.loaded) == sorted(full) and not report.dropped and not report.initialised
    return variables


def _assert_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), (err, np.abs(ref).max())


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def test_state_dict_keys_match_spec(torch_heads):
    sd = {k: tuple(v.shape) for k, v in torch_heads.state_dict().items()}
    assert sd == SPEC_SHAPES
    assert sum(int(np.prod(s)) for k, s in sd.items() if k.startswith("rpn_head.")) == 593_935
    assert sum(int(np.prod(s)) for k, s in sd.items() if k.startswith("roi_head.")) == 16_949_985


def test_flax_parameter_counts():
    """§13: RPN 593,935 and RoI 16,949,985 parameters (shapes only, nothing computed)."""
    def count(module, x):
        shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)
        return sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(shapes))

    rpn = count(RPNHead(), [jax.ShapeDtypeStruct((1, 8, 8, 256), jnp.float32)])
    bbox = count(Shared2FCBBoxHead(), jax.ShapeDtypeStruct((2, 7, 7, 256), jnp.float32))
    mask = count(FCNMaskHead(), jax.ShapeDtypeStruct((2, 14, 14, 256), jnp.float32))
    assert rpn == 593_935
    assert bbox + mask == 16_949_985


def test_rpn_head_matches_reference(torch_heads):
    rng = np.random.default_rng(0)
    # Levels of a 64x96 padded image at strides 4, 8, 16, 32, 64 (batch 2).
    feats = [rng.standard_normal((2, h, w, 256)).astype(np.float32) for h, w in ((16, 24), (8, 12), (4, 6), (2, 3),
                                                                                   (1, 2))]
    sd = {k: v.detach().numpy() for k, v in torch_heads.state_dict().items()}
    head = RPNHead()
    variables = _convert(head, [jnp.asarray(f) for f in feats], sd, "rpn_head.")
    cls, reg = jax.jit(head.apply)(variables, [jnp.asarray(f) for f in feats])
    with torch.no_grad():
        want_cls, want_reg = torch_heads.rpn_head([_nchw(f) for f in feats])
    assert len(cls) == len(reg) == 5
    for (h, w), c, r, wc, wr in zip(((16, 24), (8, 12), (4, 6), (2, 3), (1, 2)), cls, reg, want_cls, want_reg):
        assert c.shape == (2, h * w * 3) and r.shape == (2, h * w * 3, 4)
        _assert_close(c, wc.numpy())
        _assert_close(r, wr.numpy())


def test_bbox_head_matches_reference_chw_flatten(torch_heads):
    """The C,H,W flatten: converted ``shared_fcs.0`` weights are used without permutation. An H,W,C flatten of
    the same NHWC features with the same weights must NOT match (guards the test's sensitivity)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7, 7, 256)).astype(np.float32)  # NHWC RoI features
    sd = {k: v.detach().numpy() for k, v in torch_heads.state_dict().items()}
    head = Shared2FCBBoxHead()
    variables = _convert(head, jnp.asarray(x), sd, "roi_head.bbox_head.")
    cls, reg = jax.jit(head.apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        want_cls, want_reg = torch_heads.roi_head.bbox_head(_nchw(x))
    assert cls.shape == (5, 81) and reg.shape == (5, 320)
    _assert_close(cls, want_cls.numpy())
    _assert_close(reg, want_reg.numpy())

    # Negative control: H,W,C flatten with the same kernels.
    p = variables["params"]
    h = x.reshape(5, -1).astype(np.float64)
    for name in ("shared_fcs_0", "shared_fcs_1"):
        h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
    wrong_reg = h @ p["fc_reg"]["kernel"] + p["fc_reg"]["bias"]
    assert np.abs(wrong_reg - want_reg.numpy()).max() > 0.1 * np.abs(want_reg.numpy()).max()


def test_mask_head_matches_reference(torch_heads):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 14, 14, 256)).astype(np.float32)
    sd = {k: v.detach().numpy() for k, v in torch_heads.state_dict().items()}
    head = FCNMaskHead()
    variables = _convert(head, jnp.asarray(x), sd, "roi_head.mask_head.")
    assert variables["params"]["upsample"]["kernel"].shape == (2, 2, 256, 256)
    out = jax.jit(head.apply)(variables, jnp.asarray(x))
    with torch.no_grad():
        want = torch_heads.roi_head.mask_head(_nchw(x)).permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 28, 28, 80)
    _assert_close(out, want)


class _Upsample(nn.Module):
    """Holds the layer as ``upsample`` (its FCNMaskHead name) so the converter sees ``upsample.weight``."""
    features: int
    k: int

    @nn.compact
    def __call__(self, x):
        return ConvTranspose2d(self.features, self.k, name="upsample")(x)


@pytest.mark.parametrize("cin,cout,k", [(6, 5, 2), (4, 4, 2), (3, 7, 3)])
def test_conv_transpose_matches_torch(cin, cout, k):
    """ConvTranspose2d(kernel == stride) with torch's (in, out, kh, kw) weight through the generic converter;
    in != out so a swapped in/out axis cannot pass, and random (non-symmetric) taps so a flip cannot pass."""
    torch.manual_seed(3)
    ref = tnn.ConvTranspose2d(cin, cout, k, stride=k).eval()
    x = np.random.default_rng(3).standard_normal((2, 3, 4, cin)).astype(np.float32)
    ours = _Upsample(cout, k)
    sd = {f"upsample.{kk}": v.detach().numpy() for kk, v in ref.state_dict().items()}
    variables = _convert(ours, jnp.asarray(x), sd, "")
    params = variables["params"]["upsample"]
    kernel = params["kernel"]
    assert kernel.shape == (k, k, cout, cin)
    # The documented layout: kernel[a, b, o, c] == W[c, o, a, b].
    np.testing.assert_array_equal(kernel, np.transpose(sd["upsample.weight"], (2, 3, 1, 0)))
    out = ours.apply(variables, jnp.asarray(x))
    with torch.no_grad():
        want = ref(_nchw(x)).permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 3 * k, 4 * k, cout)
    _assert_close(out, want)

    # Flax's own ConvTranspose agrees only with transpose_kernel=True (kernel (kh, kw, out, in), flipped taps).
    flax_ct = nn.ConvTranspose(cout, (k, k), strides=(k, k), padding="VALID", transpose_kernel=True)
    _assert_close(flax_ct.apply({"params": params}, jnp.asarray(x)), want)
    # ... and with transpose_kernel=False the same numbers (as (kh, kw, in, out)) give the tap-flipped result.
    plain = nn.ConvTranspose(cout, (k, k), strides=(k, k), padding="VALID")
    unflipped = {"params": {"kernel": np.transpose(kernel, (0, 1, 3, 2)), "bias": params["bias"]}}
    assert np.abs(np.asarray(plain.apply(unflipped, jnp.asarray(x))) - want).max() > 1e-2 * np.abs(want).max()
