"""Train and/or evaluate a LIT detector.

    python -m lit_jax.main --config configs/synthetic_retinanet_lit_ti.py --workdir workdir/synth
    python -m lit_jax.main --config configs/retinanet_lit_ti_fpn_1x_coco.py --workdir runs/retina_ti \
        --config.optimizer.lr=2e-4 --mode train_and_eval

Modes: ``train`` (no evaluation), ``eval`` (the latest checkpoint in --workdir), ``train_and_eval``
(evaluate every ``train.eval_every_epochs`` and at the end). A run resumes from the latest checkpoint in
--workdir. Exit status: 0 done; 2 bad config, data or checkpoint (``error: ...``, before training where it can
be known then); 3 non-finite loss (the last good checkpoint is kept); 4 a checkpoint could not be saved.
Multi-host: launched under SLURM or with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set,
``jax.distributed.initialize()`` is called first (see README).
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv):
    from lit_jax import cli

    p = cli.config_parser(__doc__)
    p.add_argument("--workdir", default=None, help="checkpoints, logs, TensorBoard, results (default workdir/<config>)")
    p.add_argument("--mode", default="train_and_eval", choices=["train", "eval", "train_and_eval"])
    args, config = cli.parse(p, argv)
    if args.workdir is None:
        args.workdir = os.path.join("workdir", os.path.splitext(os.path.basename(args.config))[0])
    return args, config


def ensure_synthetic_dataset(config, generate: bool = True) -> None:
    """Generates and prepares the synthetic dataset a config's ``synthetic`` section names, if missing
    (``generate=False``: a FileNotFoundError instead), and points ``config.data`` at it."""
    if "synthetic" not in config:
        return
    from lit_jax.data.synthetic import ensure_synthetic_tfds

    syn = config.synthetic
    data_dir, dataset = ensure_synthetic_tfds(syn.root, num_train=syn.train, num_val=syn.val, seed=syn.seed,
                                              max_side=syn.max_side, generate=generate)
    config.data.data_dir, config.data.dataset = data_dir, dataset


def main(argv=None) -> int:
    from lit_jax import cli

    try:
        args, config = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    cli.setup_logging()

    from lit_jax.train import sharding

    sharding.maybe_initialize_distributed()

    from lit_jax.config import validate_config
    from lit_jax.train.checkpoint import CheckpointSaveError
    from lit_jax.train.trainer import NonFiniteLossError, Trainer

    try:
        validate_config(config)  # before the dataset is generated or anything is built
        ensure_synthetic_dataset(config)
        trainer = Trainer(config, args.workdir)
        if args.mode == "eval":
            stats = trainer.evaluate(trainer.load_variables(checkpoint=trainer.workdir))
            print("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if isinstance(v, float)))
        else:
            if args.mode == "train":
                config.train.eval_every_epochs = 0
            trainer.train(final_eval=args.mode == "train_and_eval")
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except CheckpointSaveError as err:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 4
    except (FileNotFoundError, ValueError) as err:
        logging.getLogger(__name__).debug("failed", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
