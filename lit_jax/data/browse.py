"""What the model sees: training-pipeline samples (after resize, flip, normalise, pad) with their ground truth
drawn, for ``scripts/browse_dataset.py``."""

from __future__ import annotations

import dataclasses
import os

import numpy as np


def draw_training_samples(config, out_dir: str, *, num: int, split: str = "train") -> list:
    """Draws ``num`` samples of ``split`` as the training pipeline makes them (its resize, random flip and
    padding to the bucket canvas; not shuffled): ground-truth boxes, class names and, when the pipeline carries
    them, masks. Writes ``out_dir/<image_id>.png`` (the whole canvas) and returns the paths."""
    from lit_jax.data.image import MEAN_RGB, STD_RGB
    from lit_jax.data.pipeline import DataConfig, make_train_dataset
    from lit_jax.evaluation.visualize import draw_detections, save_image
    from lit_jax.ops.mask_paste import paste_masks

    cfg = dataclasses.replace(DataConfig.from_dict(config.data), train_split=split, shuffle=False,
                              global_batch_size=1)
    data = make_train_dataset(cfg, process_index=0, process_count=1)
    names = list(data.source.category_names)
    mean = np.asarray(cfg.mean or MEAN_RGB, np.float32)
    std = np.asarray(cfg.std or STD_RGB, np.float32)
    written = []
    for batch in data.numpy_batches():
        for i in range(len(batch["images"])):
            rgb = np.clip(np.round(batch["images"][i] * std + mean), 0, 255).astype(np.uint8)
            keep = np.asarray(batch["gt_valid"][i], bool)
            boxes = np.asarray(batch["gt_boxes"][i])[keep]
            labels = np.asarray(batch["gt_labels"][i])[keep]
            masks = None
            if "gt_masks" in batch and len(boxes):
                crops = np.asarray(batch["gt_masks"][i], np.float32)[keep]
                crops = crops if cfg.mask_binary else crops / 255.0
                masks = np.asarray(paste_masks(crops, boxes, rgb.shape[:2]))
            drawn = draw_detections(rgb, boxes, np.ones(len(boxes), np.float32), labels, names, score_thr=0.0,
                                    masks=masks)
            image_id = int(batch["image_id"][i])
            written.append(save_image(os.path.join(out_dir, f"{image_id}.png"), drawn))
            if len(written) >= num:
                return written
    return written
