"""lit_jax.export: the SavedModel reloaded by TensorFlow alone and the StableHLO artefact reloaded by jax alone
give lit_jax's detections (tiny synthetic detectors with random weights; released-layout checkpoints: slow)."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from lit_jax.config import load_config, split_overrides
from lit_jax.convert.store import save_variables
from lit_jax.data.image import prepare_image
from lit_jax.export import export_detector
from lit_jax.inference import load_detector
from lit_jax.inference.detector import inference_model_section
from lit_jax.models.registry import build_detector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CANVAS = (96, 128)  # holds both test images (64x90 and 96x48 after the resize) with padding on two sides
SYNTH = {"retinanet": "synthetic_retinanet_lit_ti.py", "mask_rcnn": "synthetic_mask_rcnn_lit_ti.py"}

# TensorFlow alone: load the SavedModel, run serving_default and the class_names signature. jax and lit_jax are
# made unimportable first (keras, which TensorFlow loads, would otherwise import jax because it is installed).
TF_RELOAD = """
import importlib.abc, sys


class NoJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "lit_jax", "flax"):
            raise ImportError(f"{name} is blocked in this process")


sys.meta_path.insert(0, NoJax())
import time, numpy as np, tensorflow as tf
model_dir, inputs, outputs = sys.argv[1:4]
t = time.perf_counter()
m = tf.saved_model.load(model_dir)
load_s = time.perf_counter() - t
x = np.load(inputs)
out = m.signatures["serving_default"](images=tf.constant(x["images"]), img_shape=tf.constant(x["img_shape"]),
                                      scale_factor=tf.constant(x["scale_factor"]))
names = np.array([n.decode() for n in m.signatures["class_names"]()["class_names"].numpy()])
np.savez(outputs, class_names=names, load_s=load_s, **{k: v.numpy() for k, v in out.items()})
assert not [m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "lit_jax")]
"""

# jax alone: deserialize the StableHLO artefact and call it with its weights.npz.
JAX_RELOAD = """
import sys, numpy as np, jax
model_dir, inputs, outputs = sys.argv[1:4]
exp = jax.export.deserialize(open(model_dir + "/model.jax_export", "rb").read())
x = np.load(inputs)
out = exp.call(dict(np.load(model_dir + "/weights.npz")), x["images"], x["img_shape"], x["scale_factor"])
np.savez(outputs, **{k: np.asarray(v) for k, v in out.items()})
assert "lit_jax" not in sys.modules
"""


def tiny_overrides(kind, data_root):
    if kind == "retinanet":
        from tests.train.test_train_main import tiny_overrides as tiny

        return tiny(data_root) + ["--config.model.train_test.score_thr=0.001"]
    from tests.train.test_train_mask_rcnn import tiny_overrides as tiny

    return tiny(data_root)


def images():
    """Two RGB uint8 images of different aspect: shapes on a gradient, so detections differ between them."""
    out = []
    for h, w, seed in ((50, 70, 0), (60, 30, 1)):
        rng = np.random.default_rng(seed)
        img = np.linspace(0, 255, h * w * 3).reshape(h, w, 3).astype(np.uint8)
        for _ in range(4):
            x, y = (int(v) for v in rng.integers(0, [w - 8, h - 8]))
            cv2.rectangle(img, (x, y), (x + int(rng.integers(6, 20)), y + int(rng.integers(6, 20))),
                          [int(c) for c in rng.integers(0, 255, 3)], -1)
        out.append(img)
    return out


def inputs(det, canvas, junk=True, rgbs=None):
    """Exported-model inputs (uint8 on the canvas; the padding filled with junk that the graph must ignore)
    and lit_jax's own normalised, zero-padded images."""
    rgbs = images() if rgbs is None else rgbs
    u8 = [prepare_image(img, det.img_scale, canvas=canvas, normalize=False) for img in rgbs]
    ref = [prepare_image(img, det.img_scale, mean=det.mean, std=det.std, canvas=canvas) for img in rgbs]
    batch = np.stack([p.image for p in u8])
    if junk:
        noise = np.random.default_rng(5).integers(0, 256, batch.shape, dtype=np.uint8)
        for i, p in enumerate(u8):
            h, w = p.img_shape
            noise[i, :h, :w] = batch[i, :h, :w]
        batch = noise
    x = {"images": batch, "img_shape": np.stack([p.img_shape for p in u8]),
         "scale_factor": np.stack([p.scale_factor for p in u8])}
    return x, np.stack([p.image for p in ref])


def lit_jax_outputs(det, x, ref_images):
    out = jax.jit(det.model.predict)(det.variables, jnp.asarray(ref_images),
                                     {"img_shape": x["img_shape"], "scale_factor": x["scale_factor"]})
    return jax.tree.map(np.asarray, jax.device_get(out))


def assert_same(got, want, *, box_tol=1e-3, score_tol=1e-4, mask_tol=1e-4):
    valid = np.asarray(want.valid, bool)
    assert valid.sum() > 0
    np.testing.assert_array_equal(np.asarray(got["valid"], bool), valid)
    np.testing.assert_array_equal(got["labels"][valid], want.labels[valid])
    np.testing.assert_allclose(got["boxes"][valid], want.boxes[valid], atol=box_tol, rtol=0)
    np.testing.assert_allclose(got["scores"][valid], want.scores[valid], atol=score_tol, rtol=0)
    if want.mask_probs is not None:
        np.testing.assert_array_equal(np.asarray(got["mask_valid"], bool), want.mask_valid)
        np.testing.assert_allclose(got["mask_probs"][valid], want.mask_probs[valid], atol=mask_tol, rtol=0)
        np.testing.assert_allclose(got["mask_boxes"][valid], want.mask_boxes[valid], atol=box_tol, rtol=0)
    else:
        assert "mask_probs" not in got


def reload(script, model_dir, x, tmp_path):
    np.savez(tmp_path / "in.npz", **x)
    out = tmp_path / "out.npz"
    run = subprocess.run([sys.executable, "-c", script, str(model_dir), str(tmp_path / "in.npz"), str(out)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(np.load(out))


def random_variables(model, seed=0):
    """Random weights of the model's shapes, without running its (slow, op-by-op) init: params N(0, 0.1^2),
    BatchNorm means 0 and variances 1."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: model.init(key, (64, 64)), jax.random.PRNGKey(0))

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", ""))
        if path[0].key == "batch_stats":
            return np.full(leaf.shape, 1.0 if name == "var" else 0.0, leaf.dtype)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module", params=["retinanet", "mask_rcnn"])
def tiny(request, tmp_path_factory):
    """(kind, config path, overrides, converted weights folder) of a tiny synthetic detector, random weights."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    overrides = tiny_overrides(kind, str(tmp / "no_data"))  # never generated: export does not read the dataset
    config = os.path.join(ROOT, "configs", SYNTH[kind])
    _, parsed = split_overrides(overrides)
    model = build_detector(inference_model_section(load_config(config, parsed)))
    variables = random_variables(model)
    names = ["circle", "square", "triangle", "star", "ring", "cross"]
    weights = save_variables(str(tmp / "weights"), variables, {"class_names": names, "category_ids": list(range(1, 7))})
    return kind, config, overrides, weights, tmp


def test_saved_model_and_stablehlo_reload_without_lit_jax_and_match(tiny, tmp_path):
    kind, config, overrides, weights, tmp = tiny
    det = load_detector(config, weights, overrides=overrides)
    x, ref_images = inputs(det, CANVAS)
    want = lit_jax_outputs(det, x, ref_images)

    saved = str(tmp_path / "saved_model")
    result = export_detector(config, weights, "saved_model", saved, canvas="96x128", batch=2, overrides=overrides)
    assert result.metadata["outputs"][0] == {"name": "boxes", "shape": [2, want.boxes.shape[1], 4],
                                             "dtype": "float32"}
    got = reload(TF_RELOAD, saved, x, tmp_path)
    assert list(got.pop("class_names")) == det.class_names
    got.pop("load_s")
    assert_same(got, want)
    assert open(os.path.join(saved, "assets", "class_names.txt")).read().split() == det.class_names

    hlo = str(tmp_path / "stablehlo")
    export_detector(config, weights, "stablehlo", hlo, canvas=(96, 128), batch=2, overrides=overrides)
    assert_same(reload(JAX_RELOAD, hlo, x, tmp_path), want)
    meta = json.load(open(os.path.join(hlo, "lit_jax_export.json")))
    assert meta["canvas"] == [96, 128] and meta["class_names"] == det.class_names
    assert [i["name"] for i in meta["inputs"]] == ["images", "img_shape", "scale_factor"]


def run_cli(args, expect):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export.py")] + args, capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == expect, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def errors(run):
    return [line for line in run.stderr.splitlines() if line.startswith("error")]


@pytest.mark.parametrize("tiny", ["retinanet"], indirect=True)
def test_cli_exports_and_names_bad_requests(tiny, tmp_path):
    kind, config, overrides, weights, _ = tiny
    base = ["--config", config, "--weights", weights] + overrides
    out = str(tmp_path / "out")
    for extra, message in [
        (["--format", "onnx"], "error: format 'onnx' is unknown; known: saved_model, stablehlo"),
        (["--format", "stablehlo", "--canvas", "100x128"],
         "error: canvas 100x128 (HxW): both sides must be positive multiples of 32"),
        (["--format", "stablehlo", "--canvas", "96"], "error: canvas '96' is not HxW"),
        (["--format", "stablehlo", "--dtype", "float16"], "error: dtype 'float16' is unknown"),
    ]:
        err = errors(run_cli(base + ["--out", out] + extra, expect=2))
        assert len(err) == 1 and err[0].startswith(message), err
    # weights of another width: every mis-shaped variable named, one line
    err = errors(run_cli(base + ["--config.model.fpn_channels=32", "--format", "stablehlo", "--out", out], expect=2))
    assert len(err) == 1 and err[0].startswith(f"error: {weights} does not fit the configured detector; wrong shape")
    assert "params/neck/fpn_convs_0/conv/bias: weights (16,) vs model (32,)" in err[0]
    assert not os.path.exists(out) or not os.listdir(out)

    run = run_cli(base + ["--format", "stablehlo", "--out", out, "--canvas", "64x96"], expect=0)
    assert "wrote stablehlo of retinanet (float32, batch 1, canvas 64x96)" in run.stdout
    assert json.load(open(os.path.join(out, "lit_jax_export.json")))["config"] == config
    err = errors(run_cli(base + ["--format", "stablehlo", "--out", out], expect=2))
    assert len(err) == 1 and err[0].startswith(f"error: out {out} is not empty"), err


@pytest.mark.parametrize("tiny", ["retinanet"], indirect=True)
def test_bfloat16_stablehlo_runs_close_to_lit_jax_in_bfloat16(tiny, tmp_path):
    """bf16 against lit_jax's own bf16 model (the same graph, compiled separately): labels equal, boxes within
    BF16_TOL (float32 is held to 1e-3 px / 1e-4)."""
    kind, config, overrides, weights, _ = tiny
    det, x, want = bf16_reference(config, weights, overrides)
    hlo = str(tmp_path / "stablehlo")
    export_detector(config, weights, "stablehlo", hlo, canvas=CANVAS, batch=2, dtype="bfloat16", overrides=overrides)
    exp = jax.export.deserialize(open(os.path.join(hlo, "model.jax_export"), "rb").read())
    got = exp.call(dict(np.load(os.path.join(hlo, "weights.npz"))), x["images"], x["img_shape"], x["scale_factor"])
    assert_same({k: np.asarray(v) for k, v in got.items()}, want, **BF16_TOL)


@pytest.mark.parametrize("tiny", ["retinanet"], indirect=True)
def test_bfloat16_saved_model_runs_close_to_lit_jax_in_bfloat16(tiny, tmp_path):
    import tensorflow as tf

    kind, config, overrides, weights, _ = tiny
    det, x, want = bf16_reference(config, weights, overrides)
    saved = str(tmp_path / "saved_model")
    export_detector(config, weights, "saved_model", saved, canvas=CANVAS, batch=2, dtype="bfloat16",
                    overrides=overrides)
    got = tf.saved_model.load(saved).signatures["serving_default"](**{k: tf.constant(v) for k, v in x.items()})
    assert_same({k: v.numpy() for k, v in got.items()}, want, **BF16_TOL)


BF16_TOL = dict(box_tol=0.05, score_tol=1e-3)


def bf16_reference(config, weights, overrides):
    det = load_detector(config, weights, overrides=overrides + ["--config.model.dtype=bfloat16"])
    x, ref_images = inputs(det, CANVAS)
    return det, x, lit_jax_outputs(det, x, ref_images)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["retinanet_lit_ti", "mask_rcnn_lit_ti"])
def test_released_layout_checkpoint_exports_match(kind, tmp_path):
    """A reference-saved released-layout .pth (full LIT-Ti, COCO classes) on a 256x352 canvas, both formats."""
    import skimage.data

    from third_party.lit_torch.save_detector import save_random_detector

    pth = str(tmp_path / f"{kind}.pth")
    save_random_detector(kind, pth, seed=3, cls_bias_shift=3.0)
    config = os.path.join(ROOT, "configs", f"{kind}_fpn_1x_coco.py")
    small = ["--config.data.img_scale=(352, 256)"]  # chelsea (300x451) -> 234x352 on the 256x352 canvas
    det = load_detector(config, pth, overrides=small)
    x, ref_images = inputs(det, (256, 352), rgbs=[skimage.data.chelsea()])
    want = lit_jax_outputs(det, x, ref_images)
    saved, hlo = str(tmp_path / "saved_model"), str(tmp_path / "stablehlo")
    export_detector(config, pth, "saved_model", saved, canvas="256x352", overrides=small)
    got = reload(TF_RELOAD, saved, x, tmp_path)
    assert len(got.pop("class_names")) == 80
    got.pop("load_s")
    assert_same(got, want)
    export_detector(config, pth, "stablehlo", hlo, canvas="256x352", overrides=small)
    assert_same(reload(JAX_RELOAD, hlo, x, tmp_path), want)
