#!/usr/bin/env python
"""Draw dataset samples as the model sees them: after the training pipeline's resize, flip and pad, with the
ground-truth boxes, class names and masks.

    python scripts/browse_dataset.py --config configs/my_data.py --out browse/ --num 8 [--split val]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    from lit_jax import cli

    p = cli.config_parser(__doc__)
    p.add_argument("--out", required=True, help="folder for the drawn samples (<image_id>.png)")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--split", default=None, help="dataset split (default: data.train_split)")
    args, config = cli.parse(p, argv)
    cli.setup_logging()

    from lit_jax.data.browse import draw_training_samples
    from lit_jax.main import ensure_synthetic_dataset

    try:
        ensure_synthetic_dataset(config, generate=False)
        written = draw_training_samples(config, args.out, num=args.num, split=args.split or config.data.train_split)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(written)} samples drawn in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
