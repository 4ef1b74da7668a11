#!/usr/bin/env python
"""Converts a PyTorch LIT checkpoint (.pth) into an orbax checkpoint of Flax variables.

    python scripts/convert_weights.py --model lit_ti --src lit_ti.pth --dst weights/lit_ti
    python scripts/convert_weights.py --model lit_s  --src lit_s.pth  --dst weights/lit_s
    python scripts/convert_weights.py --model retinanet_lit_ti --src retinanet_lit_ti_1x.pth --dst weights/retina_ti

The .pth is read without torch and without executing code from it. Every key is accounted for: the
classifier-only keys are reported as dropped; any other unexpected, missing or mis-shaped key stops the
conversion with the list. The output folder holds ``variables/`` (orbax) and ``conversion.json`` (the report,
and for detectors the class names and category ids); point a config's ``model.pretrained`` at it, or give it
to ``lit_jax.inference.load_detector`` / ``predict.py --weights``. --dst is checked before the .pth is read.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    from lit_jax.convert.mapping import ConversionError
    from lit_jax.convert.mmdet import RELEASED_DETECTORS, convert_checkpoint
    from lit_jax.convert.store import check_destination, remove_held, save_variables
    from lit_jax.convert.torch_reader import CheckpointFormatError, UnsafeCheckpointError
    from lit_jax.models.registry import backbone_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=backbone_names() + sorted(RELEASED_DETECTORS),
                        help="architecture of the checkpoint: a backbone (ImageNet weights) or a released detector")
    parser.add_argument("--src", required=True, help="the PyTorch .pth file")
    parser.add_argument("--dst", required=True, help="output folder (must not hold a converted checkpoint yet)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a converted checkpoint already in --dst (once the conversion succeeded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        check_destination(args.dst, args.overwrite)
        variables, report, info = convert_checkpoint(args.model, args.src)
    except (FileNotFoundError, ConversionError, CheckpointFormatError, UnsafeCheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a folder or an unreadable file as --src
        print(f"error: --src {args.src}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(report.summary())
    try:
        if args.overwrite:
            remove_held(args.dst)
        dst = save_variables(args.dst, variables, info)
    except OSError as err:
        print(f"error: --dst {args.dst}: cannot write the checkpoint ({err.strerror or err})", file=sys.stderr)
        return 1
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
