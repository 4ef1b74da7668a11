"""Write the synthetic COCO-format shapes dataset (logic in ``lit_jax/data/synthetic.py``).

    python scripts/make_synthetic_coco.py --out data/synthetic_coco --train 64 --val 16 --seed 0

Then build the tfds dataset from it with ``python -m lit_jax.data.prepare --coco_dir data/synthetic_coco``.
"""
import argparse
import logging

from lit_jax.data.synthetic import make_synthetic_coco


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (mmdet COCO layout)")
    p.add_argument("--train", type=int, default=64, help="number of training images")
    p.add_argument("--val", type=int, default=16, help="number of validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_side", type=int, default=640, help="longest image side")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_synthetic_coco(args.out, num_train=args.train, num_val=args.val, seed=args.seed,
                        max_side=args.max_side, progress=True)


if __name__ == "__main__":
    main()
