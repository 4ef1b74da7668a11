"""RetinaNet parity: a random-weight mmdet-layout reference checkpoint, converted, gives the same head outputs
and the same top-100 detections (reference post-processing written with torch ops in third_party).

Tolerances: per-level outputs max |diff| <= 1e-4 x max |reference|; detections: same labels, boxes within
1e-3 px, scores within 1e-5, compared slot by slot in score order.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from lit_jax.convert.mmdet import load_mmdet_pth
from lit_jax.models import build_detector
from third_party.lit_torch.retinanet import retinanet_simple_test_ref
from third_party.lit_torch.save_detector import save_random_detector

RTOL = 1e-4
# A non-square padded canvas (as the original pads a 300x380 image resized by 0.8 / 0.85 in y / x).
CANVAS = (256, 352)
IMG_SHAPE = (240, 323)  # (h, w) of the resized image inside the padded canvas
SCALE = np.array([0.85, 0.8, 0.85, 0.8], np.float32)  # (w_s, h_s, w_s, h_s): w_s != h_s as in mmdet


@pytest.fixture(scope="module", params=["lit_ti", "lit_s"])
def pair(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name) / f"retinanet_{name}.pth"
    ref = save_random_detector(f"retinanet_{name}", str(path), seed=11)
    det = build_detector({"type": "retinanet", "backbone": name})
    variables = load_mmdet_pth(path, det)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, CANVAS[0], CANVAS[1], 3)).astype(np.float32)
    image[:, IMG_SHAPE[0]:] = 0.0  # padding is zero after normalisation, as the original's Pad
    image[:, :, IMG_SHAPE[1]:] = 0.0
    return name, ref, det, variables, image


def test_head_outputs_match(pair):
    name, ref, det, variables, image = pair
    (cls_out, reg_out), _ = jax.jit(lambda v, x: det.forward(v, x))(variables, jnp.asarray(image))
    with torch.no_grad():
        ref_cls, ref_reg = ref(torch.from_numpy(image).permute(0, 3, 1, 2))
    for level, (a, b, c, d) in enumerate(zip(cls_out, ref_cls, reg_out, ref_reg)):
        # torch (1, A*C, H, W) -> (1, H*W*A, C), the anchor order of our flattened outputs.
        b = b.permute(0, 2, 3, 1).reshape(1, -1, a.shape[-1]).numpy()
        d = d.permute(0, 2, 3, 1).reshape(1, -1, 4).numpy()
        for got, want, what in ((a, b, "cls"), (c, d, "reg")):
            err, scale = np.abs(np.asarray(got) - want).max(), np.abs(want).max()
            assert err <= RTOL * scale, f"{name} level {level} {what}: {err:.3g} > {RTOL} x {scale:.3g}"


def test_top100_detections_match(pair):
    name, ref, det, variables, image = pair
    info = {"img_shape": jnp.asarray([IMG_SHAPE]), "scale_factor": jnp.asarray(SCALE[None])}
    dets = jax.jit(lambda v, x, i: det.predict(v, x, i))(variables, jnp.asarray(image), info)
    with torch.no_grad():
        boxes, scores, labels = retinanet_simple_test_ref(
            ref, torch.from_numpy(image).permute(0, 3, 1, 2), IMG_SHAPE, torch.from_numpy(SCALE))
    n = int(dets.valid[0].sum())
    assert n == len(scores) > 0
    assert n == 100, "the random head should give more than 100 candidates, so the budget is exercised"
    np.testing.assert_array_equal(np.asarray(dets.labels[0, :n]), labels.numpy())
    np.testing.assert_allclose(np.asarray(dets.scores[0, :n]), scores.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(dets.boxes[0, :n]), boxes.numpy(), atol=1e-3, rtol=0)
    # Boxes are in original-image pixels: x within w / w_s, y within h / h_s (no clip after rescale).
    assert float(dets.boxes[0, :n, 2].max()) <= IMG_SHAPE[1] / SCALE[0] + 1e-3
    assert float(dets.boxes[0, :n, 3].max()) <= IMG_SHAPE[0] / SCALE[1] + 1e-3
