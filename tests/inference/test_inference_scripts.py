"""A tiny synthetic RetinaNet trained one step: load_detector on its workdir (whatever the training run's optimizer
and pretrained settings), class names from the checkpoint, and scripts/predict.py / eval_coco.py over the API."""

import glob
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from lit_jax import main as main_mod
from lit_jax.config import load_config, split_overrides
from lit_jax.data.image import prepare_image
from lit_jax.inference import load_detector, read_image
from lit_jax.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTH = os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py")
SCORE = ["--config.model.train_test.score_thr=0.001"]  # one step of training: scores stay near the prior


def tiny_overrides(data_root):
    from tests.train.test_train_main import tiny_overrides as tiny

    return tiny(data_root)


def _config(data_root, *extra):
    _, overrides = split_overrides(tiny_overrides(data_root) + SCORE + list(extra))
    config = load_config(SYNTH, overrides)
    main_mod.ensure_synthetic_dataset(config)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data_root = str(tmp_path_factory.mktemp("synthetic_data"))
    workdir = str(tmp_path_factory.mktemp("train"))
    config = _config(data_root, "--config.train.max_steps=1", "--config.train.checkpoint_every_steps=1")
    Trainer(config, workdir).train(final_eval=False)
    images = sorted(glob.glob(os.path.join(data_root, "synthetic_coco", "*", "val2017", "*.jpg")))
    return data_root, workdir, config, images


def _run(args, expect=0):
    run = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == expect, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def test_workdir_weights_whatever_the_training_settings(trained):
    data_root, workdir, config, images = trained
    # Another optimizer and a pretrained backbone that does not exist here: neither is read.
    det = load_detector(SYNTH, workdir, overrides=tiny_overrides(data_root) + SCORE + [
        "--config.optimizer.grad_clip=0.5", "--config.model.pretrained=/nonexistent/lit_ti"])
    from lit_jax.data.sources import open_source

    names = open_source(config.data.data_dir, config.data.dataset).category_names
    assert det.class_names == list(names)  # carried by the checkpoint
    (r,) = det(images[0])
    variables = Trainer(config, workdir).load_variables(checkpoint=workdir)
    prep = prepare_image(read_image(images[0]), (96, 64))
    out = jax.jit(det.model.predict)(variables, jnp.asarray(prep.image[None]),
                                     {"img_shape": prep.img_shape[None], "scale_factor": prep.scale_factor[None]})
    n = int(np.sum(out.valid[0]))
    assert n == len(r) > 0
    np.testing.assert_array_equal(r.labels, np.asarray(out.labels[0, :n]))
    np.testing.assert_allclose(r.boxes, np.asarray(out.boxes[0, :n]), atol=1e-3, rtol=0)
    np.testing.assert_allclose(r.scores, np.asarray(out.scores[0, :n]), atol=1e-5, rtol=0)
    assert list(r.names) == [names[i] for i in r.labels]
    # One step folder works too, and gives the same.
    (r1,) = load_detector(SYNTH, os.path.join(workdir, "checkpoints", "1"), overrides=tiny_overrides(data_root) + SCORE)(
        images[0])
    np.testing.assert_array_equal(r1.scores, r.scores)


def test_predict_script_folder_video_json_and_a_missing_file(trained, tmp_path):
    data_root, workdir, config, images = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(images[:6]):  # 6 synthetic val images plus 4 resized copies: 10 mixed sizes
        img = cv2.imread(path)
        cv2.imwrite(str(folder / f"img_{i}.png"), img)
        if i < 4:
            cv2.imwrite(str(folder / f"resized_{i}.png"), cv2.resize(img, None, fx=0.6 + 0.3 * i, fy=0.8))
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 64))
    for path in images[:3]:
        writer.write(cv2.resize(cv2.imread(path), (96, 64)))
    writer.release()
    out_json, out_dir = str(tmp_path / "dets.json"), str(tmp_path / "drawn")
    missing = str(tmp_path / "missing.jpg")
    run = _run([os.path.join("scripts", "predict.py"), "--config", SYNTH, "--weights", workdir, "--input", str(folder),
                "--input", video, "--input", missing, "--json", out_json, "--out-dir", out_dir]
               + tiny_overrides(data_root) + SCORE, expect=2)
    assert f"error: image {missing} does not exist" in run.stderr
    assert "13 images in" in run.stdout  # 10 images and 3 video frames; the missing file reported, not fatal
    entries = json.load(open(out_json))

    # The same folder through the API: image ids are positions in the run (the names are not numbers).
    det = load_detector(SYNTH, workdir, overrides=tiny_overrides(data_root) + SCORE)
    want = []
    for position, r in enumerate(det(str(folder)), start=1):
        want += r.to_coco(position)
    assert len(want) > 0
    assert entries[:len(want)] == want
    assert {e["image_id"] for e in entries[len(want):]} == {11, 12, 13}  # the video's frames follow
    drawn = sorted(os.listdir(out_dir))
    assert len([f for f in drawn if f.endswith(".png")]) == 10
    cap = cv2.VideoCapture(os.path.join(out_dir, "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()
    # Repeated calls on one padded shape compile once.
    det([images[0]] * 3)
    det(images[0])
    shapes = {prepare_image(read_image(p), (96, 64)).image.shape for p in sorted(glob.glob(str(folder / "*.png")))}
    assert det.compiles == len(shapes | {prepare_image(read_image(images[0]), (96, 64)).image.shape})


def test_eval_script_classwise_subset_show_and_format_only(trained, tmp_path):
    data_root, workdir, config, images = trained
    show = str(tmp_path / "show")
    run = _run([os.path.join("scripts", "eval_coco.py"), "--config", SYNTH, "--weights", workdir, "--classwise",
                "--max_images", "3", "--show_dir", show, "--show_num", "2", "--out", str(tmp_path / "r.json")]
               + tiny_overrides(data_root) + SCORE)
    stats = json.loads(run.stdout[run.stdout.index("{"):])
    from lit_jax.data.sources import open_source

    names = open_source(config.data.data_dir, config.data.dataset).category_names
    assert sorted(stats["bbox_AP_per_class"]) == sorted(names)
    assert "category" in run.stdout and all(n in run.stdout for n in names)  # the printed table
    results = json.load(open(tmp_path / "r.json"))
    assert len({r["image_id"] for r in results}) <= 3
    assert len(os.listdir(show)) == 2
    # format_only: no annotation file needed (test-dev); results written, nothing evaluated.
    out = str(tmp_path / "test_dev.json")
    run = _run([os.path.join("scripts", "eval_coco.py"), "--config", SYNTH, "--weights", workdir, "--format_only",
                "--out", out, "--config.eval.ann_file=/nonexistent/instances_test.json"]
               + tiny_overrides(data_root) + SCORE)
    assert "bbox_mAP" not in run.stdout
    val_ids = set(open_source(config.data.data_dir, config.data.dataset).index("val")["image_id"].tolist())
    assert {r["image_id"] for r in json.load(open(out))} == val_ids  # every val image has detections at 0.001
