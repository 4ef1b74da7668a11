"""Build the tfds dataset of a COCO-format directory, once.

    python -m lit_jax.data.prepare --coco_dir data/coco [--out data/tfds] [--name coco] [--skip_bad]

COCO 2017 in mmdetection's layout (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``)
gives splits 'train' and 'val'. Building an existing version is a no-op. The dataset is written to
``OUT/coco_instances/NAME/1.0.0``; the input pipeline reads it with ``DataConfig(data_dir=OUT,
dataset='coco_instances/NAME')``.

For tfds' own ``coco/2017`` (box-only, already prepared in a tfds data dir; it cannot be downloaded here),
no preparation is needed: use ``DataConfig(dataset='coco/2017', data_dir=...)``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parse_split(s: str) -> tuple[str, str, str]:
    try:
        name, rest = s.split("=", 1)
        ann, img = rest.split(":", 1)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--split wants NAME=ANN_FILE:IMG_DIR, got {s!r}") from e
    return name, ann, img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco_dir", required=True, help="root of the COCO-format dataset")
    p.add_argument("--out", default=None, help="tfds data dir (default $LIT_JAX_TFDS_DIR or data/tfds)")
    p.add_argument("--name", default=None, help="config name (default: the directory's base name)")
    p.add_argument("--split", action="append", type=_parse_split, default=[],
                   help="explicit split NAME=ANN_FILE:IMG_DIR relative to --coco_dir (repeatable); "
                        "default: annotations/instances_<X>.json with folder <X>/")
    p.add_argument("--no_masks", action="store_true", help="boxes only (no 'segmentation' needed)")
    p.add_argument("--skip_bad", action="store_true",
                   help="skip and count bad images/annotations instead of stopping at the first")
    p.add_argument("--no_verify_images", action="store_true",
                   help="do not decode every image at build time (only check that the files exist)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images for verification")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from lit_jax.data import coco_builder
    if not os.path.isdir(args.coco_dir):
        return _error(f"--coco_dir {args.coco_dir}: no such directory")
    try:
        builder = coco_builder.build(
            args.coco_dir, args.out, args.name, with_masks=not args.no_masks, skip_bad=args.skip_bad,
            verify_images=not args.no_verify_images, splits=args.split, num_workers=args.workers)
    except coco_builder.CocoFormatError as e:
        return _error(str(e))
    except OSError as e:  # unreadable annotation/image file, output folder not writable, ...
        return _error(f"{e.filename or args.coco_dir}: {e.strerror or e}")
    md = builder.info.metadata or {}
    for split, info in (md.get("splits") or {}).items():
        print(f"{split}: {info['num_images']} images, {info['num_annotations']} annotations kept "
              f"(of {info.get('num_images_in', '?')} / {info.get('num_annotations_in', '?')} in the JSON); "
              f"skipped {format_skipped(info['skipped'])}")
    print(f"dataset: {builder.data_dir}")
    return 0


def format_skipped(skipped: dict) -> str:
    """``reason: N images, M annotations; ...`` or 'nothing'."""
    if not skipped:
        return "nothing"
    return "; ".join(f"{k}: {c['images']} images, {c['annotations']} annotations"
                     if isinstance(c, dict) else f"{k}: {c}" for k, c in sorted(skipped.items()))


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
