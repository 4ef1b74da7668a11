#!/usr/bin/env python
"""Performance harness: compile time, step time, images/s, peak memory and FLOPs of a LIT model, optionally
against the PyTorch reference in the same process.

    python scripts/benchmark.py --config configs/retinanet_lit_s_fpn_1x_coco.py --mode infer --size 800x1344
    python scripts/benchmark.py --config configs/synthetic_retinanet_lit_ti.py --mode train --batch 8
    python scripts/benchmark.py --config CFG --dtype bfloat16 --config.model.backbone_args.attention_impl=cudnn
    PYTHONPATH=. python scripts/benchmark.py --config CFG --mode backbone --compare-torch   # from the repo root

Modes (the config's ``model`` section builds the model; random weights, synthetic inputs):
  backbone  the backbone forward in eval mode (``train=False``); outputs: the 4 stage maps.
  infer     the jitted ``detector.predict(variables, images, {'img_shape', 'scale_factor'})``.
  infer --image PATH  the whole user path on a real image at the config's test scale (``data.img_scale``), and
            the same computation as separately jitted stages for a per-stage breakdown.
  train     the jitted train step of ``lit_jax.train.trainer`` on a synthetic batch.
  train --breakdown  (Mask R-CNN) the loss + gradient split into separately compiled parts, timed with the whole
            loss + gradient and the whole train step; ``--baseline KEY=VALUE`` adds a second build of the model.

``--compare-torch`` (backbone, infer) also times the PyTorch reference of ``third_party/lit_torch``, which is not
installed with lit_jax: run from the repository root with ``PYTHONPATH=.``. Each measurement appends one JSON line
to ``--out`` (default ``workdir/benchmarks/results.jsonl``; ``workdir*`` is git-ignored). Config keys can be
overridden with ``--config.a.b=value``; the backbone's performance switches (``attention_impl``,
``attention_query_chunk``, ``rel_bias_impl``, ``dcn_impl``, ``remat_policy``, ``mlp_token_chunk``: see
``lit_jax.models.lit.LITTi``) may be named under ``model.backbone_args`` even where the config file does not list
them. What is measured and how: ``lit_jax.benchmarking.harness`` and docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The synthetic modes import neither tensorflow, tensorflow_datasets nor pycocotools (only the data pipeline and
# evaluation do); the config files need ml_collections (a small pure-Python wheel that travels to a GPU image).

DEFAULT_OUT = os.path.join("workdir", "benchmarks", "results.jsonl")
MODES = ("backbone", "infer", "train")

# The LIT backbone fields a benchmark may switch with --config.model.backbone_args.<name>=... (added to the config
# with their defaults when the file does not list them).
PERF_SWITCHES = ("attention_impl", "attention_query_chunk", "rel_bias_impl", "dcn_impl", "remat_policy",
                 "mlp_token_chunk")


def parse_args(argv=None):
    """-> (args, config): the harness flags and the config with ``--config.*`` overrides and --dtype applied."""
    from lit_jax import cli

    p = cli.config_parser(__doc__)
    p.add_argument("--mode", choices=MODES, default="infer")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 1; train: the config's batch)")
    p.add_argument("--size", default=None, help="HxW canvas, e.g. 800x1344 (default: the config's first canvas)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (per framework)")
    p.add_argument("--warmup", type=int, default=1, help="steps run before the timed ones (reported apart)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (model.dtype)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON lines file the records are appended to")
    p.add_argument("--compare-torch", action="store_true", help="also time the PyTorch reference (same input)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: the cores XLA uses)")
    p.add_argument("--cores", type=int, default=None,
                   help="restrict the process to its first N allowed cores before JAX and torch start (their thread "
                        "pools follow); default: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the device's peak FLOP/s for the dtype (e.g. 989e12: H200 dense bf16); records MFU = "
                        "achieved FLOP/s / this")
    p.add_argument("--image", default=None,
                   help="infer mode: time the whole user path on this image file (decode, resize, normalise, pad, "
                        "predict, mask paste, results on the host) with a per-stage breakdown")
    p.add_argument("--breakdown", action="store_true",
                   help="train mode, Mask R-CNN: also time the loss + gradient split into separately jitted parts "
                        "(backbone, FPN, RPN head, RPN targets, proposals, RoI sampling, RoIAlign, heads, mask "
                        "targets, losses; lit_jax.benchmarking.staged_train), each part's FLOPs and share, in the "
                        "same alternating rounds as the whole loss + gradient and the whole train step")
    p.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                   help="with --breakdown: also build the model with this config override (repeatable, e.g. "
                        "model.train_test.roi_align_backward=rows) and time its parts and whole loss + gradient in "
                        "the same rounds, on the same weights and batch")
    args, config = cli.parse(p, argv, prepare=_add_perf_switches)
    if args.dtype:
        config.model.dtype = args.dtype
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    from lit_jax.models.layers import resolve_query_chunk, resolve_token_chunk

    try:  # the backbone checks the chunk switches while tracing; say it here, before anything compiles
        resolve_query_chunk(config.model.backbone_args.attention_query_chunk)
        resolve_token_chunk(config.model.backbone_args.mlp_token_chunk)
    except ValueError as err:
        p.error(str(err))
    args.overrides = [a for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--config.")]
    return args, config


def _add_perf_switches(config) -> None:
    """Lets ``--config.model.backbone_args.<switch>`` name the backbone's performance switches."""
    from lit_jax.models.lit import LITTi

    args = config.model.backbone_args
    for name in PERF_SWITCHES:
        if name not in args:
            args[name] = LITTi.__dataclass_fields__[name].default


def main(argv=None) -> int:
    try:
        args, config = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from lit_jax.benchmarking.harness import measure

    try:
        measure(args, config)
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
