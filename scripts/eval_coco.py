#!/usr/bin/env python
"""COCO evaluation of a LIT detector (bbox; segm for Mask R-CNN), or of a results JSON alone.

    python scripts/eval_coco.py --config configs/retinanet_lit_ti_fpn_1x_coco.py --weights runs/retina_ti
    python scripts/eval_coco.py --config configs/retinanet_lit_ti_fpn_1x_coco.py --weights retinanet_lit_ti.pth --classwise
    python scripts/eval_coco.py --config CFG --weights W --max_images 20 --show_dir drawn/
    python scripts/eval_coco.py --config CFG --weights W --format_only --out test_dev_results.json
    python scripts/eval_coco.py --config CFG --results_only results.json

--weights takes a released mmdet .pth (converted on the fly, read without torch, no code executed), a
convert_weights.py folder, a training workdir (latest step) or a checkpoint step folder. Detections go to
--out (default results.json beside the weights; a COCO results JSON: original category ids, xywh boxes of the
original image, and for Mask R-CNN an RLE ``segmentation`` per detection), then pycocotools' tables are printed:
bbox, and segm for Mask R-CNN (or for a results file with segmentations). --classwise adds the AP of every
class (printed and in the returned stats); --format_only writes the results only (no annotations needed);
--max_images N evaluates the first N images by id; --show_dir draws the predictions of the first images.
The dataset must be prepared already (a synthetic config's dataset is made by ``python -m lit_jax.main``).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    from lit_jax import cli

    p = cli.config_parser(__doc__)
    src = cli.add_model_source(p)
    src.add_argument("--results_only", help="evaluate this COCO results JSON, no model")
    p.add_argument("--out", default=None, help="where to write the results JSON (default: beside the weights)")
    p.add_argument("--mode", choices=["per_image", "bucket"], default=None, help="override eval.mode")
    p.add_argument("--classwise", action="store_true", help="per-class AP table (bbox, and segm for Mask R-CNN)")
    p.add_argument("--max_images", type=int, default=None, help="evaluate the first N images (by id) only")
    p.add_argument("--format_only", action="store_true", help="write the results JSON only, evaluate nothing")
    p.add_argument("--show_dir", default=None, help="draw the predictions of the first --show_num images here")
    p.add_argument("--show_num", type=int, default=20)
    args, config = cli.parse(p, argv)
    cli.setup_logging()
    if args.mode:
        config.eval.mode = args.mode
    if args.max_images is not None and args.max_images < 1:
        print(f"error: --max_images must be >= 1, got {args.max_images}", file=sys.stderr)
        return 2

    from lit_jax.evaluation.runs import evaluate_results_only, evaluate_weights
    from lit_jax.main import ensure_synthetic_dataset
    from lit_jax.train import sharding

    sharding.maybe_initialize_distributed()
    try:
        ensure_synthetic_dataset(config, generate=False)
        if args.results_only:
            stats = evaluate_results_only(config, args.results_only, classwise=args.classwise)
        else:
            stats, out = evaluate_weights(config, args.weights, out=args.out, classwise=args.classwise,
                                          max_images=args.max_images, format_only=args.format_only,
                                          show_dir=args.show_dir, show_num=args.show_num)
            if out:
                print(f"results written to {out}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stats:
        print(json.dumps({k: v for k, v in stats.items() if isinstance(v, (float, dict))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
