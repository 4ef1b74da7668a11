"""scripts/browse_dataset.py draws training samples as the pipeline makes them: the canvas size, and ground truth
drawn in the class colours inside each valid box (checked against the batch the pipeline gives)."""

import os
import subprocess
import sys

import cv2
import numpy as np

from lit_jax.evaluation.visualize import class_color

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTH = os.path.join(ROOT, "configs", "synthetic_mask_rcnn_lit_ti.py")


def test_browse_dataset_draws_the_pipelines_samples(tmp_path):
    from lit_jax import main as main_mod
    from lit_jax.config import load_config, split_overrides
    from lit_jax.data.pipeline import DataConfig, make_train_dataset

    over = [f"--config.synthetic.root={tmp_path / 'data'}", "--config.synthetic.train=4", "--config.synthetic.val=2",
            "--config.synthetic.max_side=96", "--config.data.img_scale=(96, 64)"]
    _, parsed = split_overrides(over)
    config = load_config(SYNTH, parsed)
    main_mod.ensure_synthetic_dataset(config)  # the browse script itself never generates a dataset
    out = str(tmp_path / "browse")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "browse_dataset.py"), "--config", SYNTH,
                          "--out", out, "--num", "3"] + over, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) == 3 and "3 samples drawn" in run.stdout

    import dataclasses

    cfg = dataclasses.replace(DataConfig.from_dict(config.data), shuffle=False, global_batch_size=1)
    batch = next(make_train_dataset(cfg, process_index=0, process_count=1).numpy_batches())
    drawn = cv2.cvtColor(cv2.imread(os.path.join(out, f"{int(batch['image_id'][0])}.png")), cv2.COLOR_BGR2RGB)
    assert drawn.shape[:2] == batch["images"].shape[1:3]  # the whole padded canvas
    x1, y1, x2, y2 = np.round(batch["gt_boxes"][0][0]).astype(int)
    color = np.asarray(class_color(int(batch["gt_labels"][0][0])))
    # The box's left edge (within a pixel) is drawn in the class colour along most of its height.
    edge = drawn[max(y1, 0):y2 + 1, max(x1 - 1, 0):x1 + 2].astype(int)
    assert (np.abs(edge - color).sum(axis=2).min(axis=1) < 40).mean() > 0.5
