"""Mask R-CNN through the training entry point and eval_coco.py on a tiny synthetic dataset (bbox + segm)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax.numpy as jnp

from lit_jax import main as main_mod
from lit_jax.config import load_config, split_overrides
from lit_jax.models import build_detector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTH = os.path.join(ROOT, "configs", "synthetic_mask_rcnn_lit_ti.py")


def tiny_overrides(data_root):
    return [
        f"--config.synthetic.root={data_root}", "--config.synthetic.train=12", "--config.synthetic.val=6",
        "--config.synthetic.max_side=96", "--config.data.img_scale=(96, 64)", "--config.data.global_batch_size=2",
        "--config.data.eval_global_batch_size=2", "--config.data.shuffle_buffer=16",
        "--config.model.backbone_args.embed_dims=(8, 16, 16, 16)", "--config.model.backbone_args.depths=(1, 1, 1, 1)",
        "--config.model.backbone_args.num_heads=(1, 1, 1, 1)", "--config.model.fpn_channels=16",
        "--config.model.head.fc_out_channels=16", "--config.model.head.mask_conv_channels=8",
        "--config.model.train_test.rcnn_num_samples=32", "--config.model.train_test.rpn_train_nms_pre=100",
        "--config.model.train_test.rpn_train_max_per_img=50", "--config.model.train_test.rpn_nms_pre=100",
        "--config.model.train_test.rpn_max_per_img=50",
        # two steps leave every score near the prior: a low threshold so there are detections (and masks) to score
        "--config.model.train_test.score_thr=0.001",
        "--config.train.log_every_steps=1", "--config.train.eval_every_epochs=0",
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_masks"))


def _run_script(args, timeout=900):
    run = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def test_main_trains_and_eval_script_reports_bbox_and_segm(data_root, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    workdir = str(tmp_path / "train")
    rc = main_mod.main(["--config", SYNTH, "--workdir", workdir, "--config.train.max_steps=2",
                        "--config.train.checkpoint_every_steps=2"] + tiny_overrides(data_root))
    assert rc == 0
    lines = [json.loads(x) for x in open(os.path.join(workdir, "eval_results.jsonl"))]
    assert lines[-1]["step"] == 2 and "bbox_mAP" in lines[-1] and "segm_mAP" in lines[-1]

    out = str(tmp_path / "results.json")
    stdout = _run_script([os.path.join("scripts", "eval_coco.py"), "--config", SYNTH, "--checkpoint", workdir,
                          "--out", out] + tiny_overrides(data_root))
    reported = json.loads(stdout[stdout.index("{"):])
    results = json.load(open(out))
    assert results and all("segmentation" in r for r in results)
    from lit_jax.data.sources import open_source
    from lit_jax.train.trainer import annotation_file

    _, overrides = split_overrides(tiny_overrides(data_root))
    config = load_config(SYNTH, overrides)
    main_mod.ensure_synthetic_dataset(config)
    gt_file = annotation_file(open_source(config.data.data_dir, config.data.dataset), "val")
    gt = COCO(gt_file)
    img_sizes = {i["id"]: (i["height"], i["width"]) for i in gt.dataset["images"]}
    for r in results[:20]:  # masks are RLEs at the original image size
        assert tuple(r["segmentation"]["size"]) == img_sizes[r["image_id"]]
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(gt, gt.loadRes(out), iou_type)
        ev.params.maxDets = [100, 300, 1000]  # mmdet 2.11's setting
        ev.evaluate(); ev.accumulate(); ev.summarize()
        assert reported[f"{iou_type}_mAP"] == pytest.approx(round(ev.stats[0], 3), abs=1e-9)
        assert reported[f"{iou_type}_mAP_50"] == pytest.approx(round(ev.stats[1], 3), abs=1e-9)
    again = _run_script([os.path.join("scripts", "eval_coco.py"), "--config", SYNTH, "--results_only", out]
                        + tiny_overrides(data_root))
    assert json.loads(again[again.index("{"):]) == reported

    # predict.py draws boxes and masks on one image
    image = gt.dataset["images"][0]
    path = os.path.join(os.path.dirname(os.path.dirname(gt_file)), "val2017", image["file_name"])
    out_dir = str(tmp_path / "drawn")
    stdout = _run_script([os.path.join("scripts", "predict.py"), "--config", SYNTH, "--weights", workdir,
                          "--input", path, "--out-dir", out_dir, "--score_thr", "0.0"] + tiny_overrides(data_root))
    import cv2

    drawn = os.path.join(out_dir, os.path.splitext(image["file_name"])[0] + ".png")
    assert cv2.imread(drawn).shape[:2] == (image["height"], image["width"]) and "1 images in" in stdout

    # load_detector on the workdir: the model's own predict and paste on the same preprocessed image.
    import jax

    from lit_jax.data.image import prepare_image
    from lit_jax.inference import load_detector, read_image

    det = load_detector(SYNTH, workdir, overrides=tiny_overrides(data_root))
    (r,) = det(path)
    prep = prepare_image(read_image(path), (96, 64))
    from lit_jax.inference import load_weights

    variables = load_weights(workdir, det.model).variables
    out = jax.jit(det.model.predict)(variables, jnp.asarray(prep.image[None]),
                                     {"img_shape": prep.img_shape[None], "scale_factor": prep.scale_factor[None]})
    n = int(np.sum(out.valid[0]))
    assert n == len(r) > 0 and r.masks.shape == (n, image["height"], image["width"])
    np.testing.assert_array_equal(r.labels, np.asarray(out.labels[0, :n]))
    np.testing.assert_allclose(r.boxes, np.asarray(out.boxes[0, :n]), atol=1e-3, rtol=0)
    np.testing.assert_allclose(r.scores, np.asarray(out.scores[0, :n]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(r.masks, det.model.paste(out.mask_probs[0, :n], out.mask_boxes[0, :n],
                                                           (image["height"], image["width"]), out.mask_valid[0, :n]))
    assert det.class_names == [c["name"] for c in gt.dataset["categories"]]


def test_mask_rcnn_without_mask_data_is_a_clear_error(data_root, tmp_path, capsys):
    rc = main_mod.main(["--config", SYNTH, "--workdir", str(tmp_path), "--config.data.with_masks=False"]
                       + tiny_overrides(data_root))
    assert rc == 2
    assert "data.with_masks=True" in capsys.readouterr().err


def test_paste_on_a_bucketed_canvas_equals_the_exact_canvas():
    """MaskRCNN.paste(bucket=128) pastes on a larger canvas and crops: the same masks as at ori_shape."""
    det = build_detector({"type": "mask_rcnn", "num_classes": 2,
                          "backbone_args": {"embed_dims": (8, 16, 16, 16), "depths": (1, 1, 1, 1),
                                            "num_heads": (1, 1, 1, 1)}})
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(5, 28, 28)).astype(np.float32)
    boxes = np.array([[3.2, 4.7, 60.1, 90.3], [-10, -5, 40, 20], [100, 50, 171, 133], [0, 0, 0, 0],
                      [150.5, 120.2, 180.0, 150.0]], np.float32)
    valid = np.array([True, True, True, False, True])
    exact = det.paste(jnp.asarray(probs), jnp.asarray(boxes), (133, 171), jnp.asarray(valid))
    bucketed = det.paste(jnp.asarray(probs), jnp.asarray(boxes), (133, 171), jnp.asarray(valid), bucket=128)
    assert exact.shape == bucketed.shape == (5, 133, 171)
    np.testing.assert_array_equal(exact, bucketed)
    assert exact[0].any() and not exact[3].any()

