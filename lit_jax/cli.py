"""Shared command-line plumbing of the entry points (main, eval_coco.py, predict.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax and tfds are chatty at INFO


def config_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with ``--config FILE``; ``--config.a.b=value`` overrides are taken out before parsing."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (configs/*.py); override keys with --config.a.b=v")
    return p


def add_model_source(parser: argparse.ArgumentParser):
    """``--weights`` (or its older spellings ``--checkpoint`` / ``--pth``), required, into ``args.weights``;
    returns the exclusive group for more choices."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--weights", dest="weights",
                       help="a released mmdet .pth (read without torch, no code executed), a convert_weights.py "
                            "folder, a training workdir or one checkpoint step folder")
    group.add_argument("--checkpoint", "--pth", dest="weights", help="the same as --weights")
    return group


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None, prepare=None):
    """-> (args, config); a config problem is printed as ``error: ...`` and exits with status 2.

    ``prepare(config)``: see :func:`lit_jax.config.load_config` (runs before the overrides are applied).
    """
    from lit_jax.config import ConfigError, load_config, split_overrides

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rest, overrides = split_overrides(argv)
        args = parser.parse_args(rest)
        config = load_config(args.config, overrides, prepare=prepare)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, config
