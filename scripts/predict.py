#!/usr/bin/env python
"""Run a LIT detector on images, folders, globs or videos: drawn detections, COCO results JSON, images/s.

    python scripts/predict.py --config configs/mask_rcnn_lit_ti_fpn_1x_coco.py --weights mask_rcnn_lit_ti_1x.pth \
        --input photos/ --out-dir drawn/ --json detections.json
    python scripts/predict.py --config configs/synthetic_retinanet_lit_ti.py --weights workdir/synthetic_retinanet_lit_ti \
        --input 'data/synthetic_coco/*/val2017/*.jpg' --out-dir drawn/ --score_thr 0.3 --classes circle,square

--weights: a released mmdet .pth (converted on the fly, read without torch), a convert_weights.py folder, a
training workdir (latest step) or one checkpoint step folder. Images go through the original's test pipeline
and are detected at their own 32-padded size (--canvas bucket: on the training canvases). A video input gives a
drawn video (same frame count) in --out-dir. JSON image ids: a file's numeric stem (COCO names), else its
position in the run (1-based, video frames counted too). An input that cannot be read is reported as an ``error:`` line
and the others still run (exit status 2 then).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    from lit_jax import cli

    p = cli.config_parser(__doc__)
    cli.add_model_source(p)
    p.add_argument("--input", "--image", dest="inputs", action="append", required=True,
                   help="an image, folder, glob or video (repeatable)")
    p.add_argument("--out-dir", "--out_dir", dest="out_dir", default=None, help="drawn images / videos go here")
    p.add_argument("--json", default=None, help="write all detections as a COCO results JSON")
    p.add_argument("--score_thr", type=float, default=None,
                   help="keep detections scoring above this (default: all in --json, 0.3 when drawing)")
    p.add_argument("--classes", default=None, help="comma-separated class names to keep")
    p.add_argument("--canvas", choices=["per_image", "bucket"], default="per_image")
    p.add_argument("--batch_size", type=int, default=1)
    args, config = cli.parse(p, argv)
    cli.setup_logging()
    if not (args.out_dir or args.json):
        print("error: give --out-dir (drawn images) and/or --json (COCO results)", file=sys.stderr)
        return 2

    from lit_jax.inference import WeightsError, load_detector
    from lit_jax.inference.run import run_predictions

    try:
        det = load_detector(config, args.weights, canvas=args.canvas, batch_size=args.batch_size)
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        summary = run_predictions(det, args.inputs, out_dir=args.out_dir, json_path=args.json,
                                  score_thr=args.score_thr, classes=classes)
    except (FileNotFoundError, ValueError, WeightsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for message in summary.errors:
        print(f"error: {message}", file=sys.stderr)
    print(f"{summary.images} images in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s, "
          f"{det.compiles} compiled shapes); wrote {len(summary.outputs)} files"
          + (f" to {args.out_dir}" if args.out_dir else "") + (f", detections in {args.json}" if args.json else ""))
    return 2 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
