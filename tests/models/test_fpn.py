"""FPN against the PyTorch reference (mmdet 2.x FPN) for both detector variants, and torch-nearest resizing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from lit_jax.convert.mapping import convert_state_dict
from lit_jax.models.fpn import FPN, resize_nearest
from third_party.lit_torch.fpn import FPN as TorchFPN

CHANNELS = [16, 24, 32, 40]


@pytest.mark.parametrize("variant", ["retinanet", "mask_rcnn"])
def test_fpn_matches_reference(variant):
    """RetinaNet: C3-C5 + two stride-2 convs on C5 (no ReLU); Mask R-CNN: C2-C5 + P6 = P5[::2, ::2]."""
    torch.manual_seed(0)
    if variant == "retinanet":
        ref = TorchFPN(CHANNELS, 8, num_outs=5, start_level=1, add_extra_convs="on_input").eval()
        ours = FPN(out_channels=8, num_outs=5, start_level=1, add_extra_convs="on_input")
    else:
        ref = TorchFPN(CHANNELS, 8, num_outs=5, start_level=0).eval()
        ours = FPN(out_channels=8, num_outs=5, start_level=0, add_extra_convs=None)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    rng = np.random.default_rng(0)
    # Strides 4..32 of a 64x96 (32-padded, non-square) image.
    feats = [rng.standard_normal((2, 64 // s, 96 // s, c)).astype(np.float32) for s, c in zip((4, 8, 16, 32), CHANNELS)]
    shapes = jax.eval_shape(lambda x: ours.init(jax.random.PRNGKey(0), x), [jnp.asarray(f) for f in feats])
    variables, report = convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, shapes, source="fpn")
    outs = ours.apply(variables, [jnp.asarray(f) for f in feats])
    with torch.no_grad():
        want = ref([torch.from_numpy(f).permute(0, 3, 1, 2) for f in feats])
    assert len(outs) == len(want) == 5
    for a, b in zip(outs, want):
        b = b.permute(0, 2, 3, 1).numpy()
        assert a.shape == b.shape
        assert np.abs(np.asarray(a) - b).max() <= 1e-4 * np.abs(b).max()


@pytest.mark.parametrize("src,dst", [((3, 5), (6, 10)), ((4, 6), (7, 9)), ((5, 3), (2, 8))])
def test_resize_nearest_matches_torch(src, dst):
    x = np.random.default_rng(1).standard_normal((1,) + src + (2,)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="nearest").permute(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), dst)), want.numpy())
