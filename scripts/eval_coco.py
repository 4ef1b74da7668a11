#!/usr/bin/env python
"""COCO evaluation of a LIT detector (bbox; segm for Mask R-CNN), or of a results JSON alone.

    python scripts/eval_coco.py --config configs/retinanet_lit_ti_fpn_1x_coco.py --checkpoint runs/retina_ti
    python scripts/eval_coco.py --config configs/retinanet_lit_ti_fpn_1x_coco.py --pth retinanet_lit_ti.pth
    python scripts/eval_coco.py --config CFG --results_only results.json

--checkpoint takes a training workdir (latest step), a checkpoint step folder, or a convert_weights.py output
folder; --pth a released mmdet checkpoint, converted on the fly (read without torch, no code executed).
Detections go to --out (default results.json beside the checkpoint; a COCO results JSON: original category
ids, xywh boxes of the original image, and for Mask R-CNN an RLE ``segmentation`` per detection), then
pycocotools' tables are printed: bbox, and segm for Mask R-CNN (or for a results file with segmentations). Config keys can be overridden with --config.a.b=value.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    from lit_jax import cli

    p = cli.config_parser(__doc__)
    src = cli.add_model_source(p)
    src.add_argument("--results_only", help="evaluate this COCO results JSON, no model")
    p.add_argument("--out", default=None, help="where to write the results JSON (default: beside the checkpoint)")
    p.add_argument("--mode", choices=["per_image", "bucket"], default=None, help="override eval.mode")
    args, config = cli.parse(p, argv)
    cli.setup_logging()
    if args.mode:
        config.eval.mode = args.mode

    from lit_jax.main import ensure_synthetic_dataset
    from lit_jax.train import sharding

    sharding.maybe_initialize_distributed()
    try:
        ensure_synthetic_dataset(config)
        if args.results_only:
            stats = evaluate_results_only(config, args.results_only)
        else:
            from lit_jax.train.trainer import Trainer

            workdir = args.checkpoint if args.checkpoint and os.path.isdir(args.checkpoint) else os.getcwd()
            trainer = Trainer(config, workdir)
            variables = trainer.load_variables(checkpoint=args.checkpoint, pth=args.pth)
            out = args.out or os.path.join(
                os.path.dirname(os.path.abspath(args.pth)) if args.pth else os.path.abspath(args.checkpoint),
                "results.json")
            stats = trainer.evaluate(variables, results_path=out)
            if trainer.is_main:
                print(f"results written to {out}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stats:
        print(json.dumps({k: v for k, v in stats.items() if isinstance(v, float)}, indent=1))
    return 0


def evaluate_results_only(config, results_path: str) -> dict:
    from lit_jax.data.sources import open_source
    from lit_jax.evaluation.coco_eval import evaluate_results_file
    from lit_jax.train.trainer import annotation_file

    ann = config.eval.get("ann_file", "") or annotation_file(
        open_source(config.data.data_dir, config.data.dataset), config.data.eval_split)
    with open(results_path) as f:
        results = json.load(f)
    with_segm = any("segmentation" in r for r in results)
    return evaluate_results_file(ann, results_path, iou_types=("bbox", "segm") if with_segm else ("bbox",))


if __name__ == "__main__":
    sys.exit(main())
