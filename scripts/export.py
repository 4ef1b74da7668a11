#!/usr/bin/env python
"""Export a trained LIT detector: a TensorFlow SavedModel (TF Serving, TF runtime) or serialized StableHLO
(jax.export, for XLA-based runtimes), on one fixed canvas and batch.

    python scripts/export.py --config configs/retinanet_lit_ti_fpn_1x_coco.py --weights retinanet_lit_ti_1x.pth \
        --format saved_model --out exported/retinanet_lit_ti
    python scripts/export.py --config configs/mask_rcnn_lit_ti_fpn_1x_coco.py --weights mask_rcnn_lit_ti_1x.pth \
        --format stablehlo --out exported/mask_rcnn_hlo --canvas 800x1344 --batch 1 --dtype bfloat16

Inputs of the exported model: images uint8 (B, H, W, 3) RGB, resized as mmdet's test pipeline and placed at
the top-left of the canvas; img_shape int32 (B, 2) (h, w) after the resize; scale_factor float32 (B, 4).
Normalisation runs inside. --canvas HxW (multiples of 32) defaults to the config's first training canvas.
Layouts, reload snippets and limits: docs/export.md.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    from lit_jax import cli
    from lit_jax.export import DTYPES, FORMATS

    p = cli.config_parser(__doc__)
    cli.add_model_source(p)
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output folder (must be empty or new, unless --overwrite)")
    p.add_argument("--canvas", default=None, help="HxW, multiples of 32 (default: the config's first canvas)")
    p.add_argument("--batch", type=int, default=1, help="images per call (fixed)")
    p.add_argument("--dtype", default="float32", help=f"compute precision: {', '.join(DTYPES)}")
    p.add_argument("--platforms", default=None, help="comma-separated lowering platforms, e.g. cpu,cuda "
                                                     "(default: this machine's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args, config = cli.parse(p, argv)
    cli.setup_logging()

    from lit_jax.export import ExportError, check_request, export_detector, parse_canvas
    from lit_jax.inference import WeightsError

    try:
        check_request(args.format, args.dtype, args.batch, args.out, args.overwrite)  # before reading weights
        canvas = parse_canvas(args.canvas) if args.canvas else None
        platforms = [s.strip() for s in args.platforms.split(",")] if args.platforms else None
        result = export_detector(config, args.weights, args.format, args.out, canvas=canvas, batch=args.batch,
                                 dtype=args.dtype, platforms=platforms, overwrite=args.overwrite,
                                 config_name=args.config)
    except (ExportError, WeightsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.metadata
    print(f"wrote {args.format} of {m['detector']} ({m['dtype']}, batch {m['batch']}, canvas "
          f"{m['canvas'][0]}x{m['canvas'][1]}) to {result.out}: {result.size_bytes / 2**20:.1f} MiB in "
          f"{result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
