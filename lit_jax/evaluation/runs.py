"""The evaluation runs behind ``scripts/eval_coco.py``: weights on a prepared split, or a results JSON alone."""

from __future__ import annotations

import json
import os
from typing import Optional


def evaluate_weights(config, weights: str, *, out: Optional[str] = None, classwise: bool = False,
                     max_images: Optional[int] = None, format_only: bool = False, show_dir: Optional[str] = None,
                     show_num: int = 20) -> tuple[dict, Optional[str]]:
    """Evaluates ``weights`` (see :func:`lit_jax.inference.weights.load_weights`) on ``data.eval_split``.

    Returns ``(stats, results_path)``: the results JSON goes to ``out``, default ``results.json`` beside the
    weights (in the folder, or beside a ``.pth``). Only process 0 returns stats and writes files."""
    from lit_jax.train.trainer import Trainer

    weights = os.path.abspath(weights)
    trainer = Trainer(config, weights if os.path.isdir(weights) else os.path.dirname(weights))
    variables = trainer.load_variables(checkpoint=weights)
    out = out or os.path.join(weights if os.path.isdir(weights) else os.path.dirname(weights), "results.json")
    stats = trainer.evaluate(variables, results_path=out, classwise=classwise, max_images=max_images,
                             format_only=format_only, show_dir=show_dir, show_num=show_num if show_dir else 0)
    return stats, out if trainer.is_main else None


def evaluate_results_only(config, results_path: str, *, classwise: bool = False) -> dict:
    """Evaluates a COCO results JSON against the annotation file of the config's eval split (or
    ``eval.ann_file``); segm too when the results carry segmentations."""
    from lit_jax.data.sources import open_source
    from lit_jax.evaluation.coco_eval import evaluate_results_file
    from lit_jax.train.trainer import annotation_file

    ann = config.eval.get("ann_file", "") or annotation_file(
        open_source(config.data.data_dir, config.data.dataset), config.data.eval_split)
    try:
        with open(results_path) as f:
            results = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{results_path} is not valid JSON: {err}") from None
    with_segm = any("segmentation" in r for r in results)
    return evaluate_results_file(ann, results_path, iou_types=("bbox", "segm") if with_segm else ("bbox",),
                                 classwise=classwise)
