#!/usr/bin/env python
"""Converts a PyTorch LIT checkpoint (.pth) into an orbax checkpoint of Flax variables.

    python scripts/convert_weights.py --model lit_ti --src lit_ti.pth --dst weights/lit_ti
    python scripts/convert_weights.py --model lit_s  --src lit_s.pth  --dst weights/lit_s
    python scripts/convert_weights.py --model retinanet_lit_ti --src retinanet_lit_ti_1x.pth --dst weights/retina_ti

The .pth is read without torch and without executing code from it. Every key is accounted for: the
classifier-only keys are reported as dropped; any other unexpected, missing or mis-shaped key stops the
conversion with the list. The output folder holds ``variables/`` (orbax) and ``conversion.json`` (the report);
point a config's ``model.pretrained`` at it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lit_jax.convert.lit import convert_backbone  # noqa: E402
from lit_jax.convert.mmdet import convert_detector  # noqa: E402
from lit_jax.convert.mapping import ConversionError  # noqa: E402
from lit_jax.convert.store import held_entries, save_variables  # noqa: E402
from lit_jax.convert.torch_reader import CheckpointFormatError, UnsafeCheckpointError, extract_state_dict, read_pth  # noqa: E402
from lit_jax.models.registry import backbone_names, build_backbone, build_detector  # noqa: E402

# Released mmdet detectors: name -> the model section of its config.
DETECTORS = {
    "retinanet_lit_ti": {"type": "retinanet", "backbone": "lit_ti"},
    "retinanet_lit_s": {"type": "retinanet", "backbone": "lit_s"},
    "mask_rcnn_lit_ti": {"type": "mask_rcnn", "backbone": "lit_ti"},
    "mask_rcnn_lit_s": {"type": "mask_rcnn", "backbone": "lit_s"},
}


def convert(model: str, src: str):
    """Reads ``src`` and converts it for ``model``; returns (variables, report)."""
    raw = read_pth(src, allow_unknown_as_placeholder=model in DETECTORS)
    state_dict = extract_state_dict(raw, src)
    if model in DETECTORS:
        return convert_detector(state_dict, build_detector(DETECTORS[model]), source=src)
    prefix = "backbone." if any(k.startswith("backbone.") for k in state_dict) else ""
    return convert_backbone(state_dict, build_backbone(model), source=src, prefix=prefix)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _dst_problem(dst: str, overwrite: bool) -> str | None:
    """Why ``dst`` cannot take the output (None when it can); checked before the .pth is read."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        return f"--dst {dst} exists and is not a folder"
    held = held_entries(dst)
    if held and not overwrite:
        return (f"--dst {dst} already holds a converted checkpoint ({', '.join(held)}); choose another "
                "folder or pass --overwrite")
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=backbone_names() + sorted(DETECTORS),
                        help="architecture of the checkpoint: a backbone (ImageNet weights) or a released detector")
    parser.add_argument("--src", required=True, help="the PyTorch .pth file")
    parser.add_argument("--dst", required=True, help="output folder (must not hold a converted checkpoint yet)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a converted checkpoint already in --dst (once the conversion succeeded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    problem = _dst_problem(args.dst, args.overwrite)
    if problem:
        return _error(problem)
    try:
        variables, report = convert(args.model, args.src)
    except (FileNotFoundError, ConversionError, CheckpointFormatError, UnsafeCheckpointError, ValueError) as err:
        return _error(str(err))
    except OSError as err:  # a folder or an unreadable file as --src
        return _error(f"--src {args.src}: {err.strerror or err}")
    print(report.summary())
    if args.overwrite:
        for old in held_entries(args.dst):
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old)
            else:
                os.remove(old)
    try:
        dst = save_variables(args.dst, variables, {"model": args.model, **dataclasses.asdict(report)})
    except OSError as err:
        return _error(f"--dst {args.dst}: cannot write the checkpoint ({err.strerror or err})")
    print(f"wrote {dst}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
