"""Draw COCO results (boxes, class names, masks) on the dataset images they belong to, for a person to look at."""

from __future__ import annotations

import collections
import os
from typing import Sequence

import numpy as np

from lit_jax.evaluation.visualize import draw_detections, save_image


def draw_results_on_split(source, split: str, results: Sequence[dict], out_dir: str, *, num: int,
                          class_names: Sequence[str], category_ids: Sequence[int], score_thr: float = 0.3) -> list:
    """Draws the ``results`` (COCO results dicts) of the first ``num`` images (by id) of ``source``'s ``split``
    into ``out_dir/<image_id>.png``; returns the paths written. Images are decoded as the pipeline does
    (cv2, EXIF applied); a detection is drawn when ``score > score_thr``."""
    import cv2
    from pycocotools import mask as mask_util

    from lit_jax.data.image import decode_bgr

    wanted = set(np.sort(source.index(split)["image_id"])[:int(num)].tolist())
    by_image = collections.defaultdict(list)
    for r in results:
        by_image[int(r["image_id"])].append(r)
    label_of = {int(c): i for i, c in enumerate(category_ids)}
    written = []
    for e in source.records(split).as_numpy_iterator():
        image_id = int(e["image_id"])
        if image_id not in wanted:
            continue
        rgb = cv2.cvtColor(decode_bgr(e["image"], e["filename"].decode()), cv2.COLOR_BGR2RGB)
        dets = by_image.get(image_id, [])
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)], np.float32)
        scores = np.asarray([d["score"] for d in dets], np.float32)
        labels = np.asarray([label_of[int(d["category_id"])] for d in dets], np.int64)
        masks = None
        if dets and all("segmentation" in d for d in dets):
            masks = np.stack([mask_util.decode(d["segmentation"]).astype(bool) for d in dets])
        drawn = draw_detections(rgb, boxes.reshape(-1, 4), scores, labels, list(class_names), score_thr=score_thr,
                                masks=masks)
        written.append(save_image(os.path.join(out_dir, f"{image_id}.png"), drawn))
        wanted.discard(image_id)
        if not wanted:
            break
    return written
