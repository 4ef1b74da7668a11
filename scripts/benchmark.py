#!/usr/bin/env python
"""Performance harness: compile time, step time, images/s, peak memory and FLOPs of a LIT model, optionally
against the PyTorch reference in the same process.

    python scripts/benchmark.py --config configs/retinanet_lit_ti_fpn_1x_coco.py --mode backbone --compare-torch
    python scripts/benchmark.py --config configs/retinanet_lit_s_fpn_1x_coco.py --mode infer --size 800x1344
    python scripts/benchmark.py --config configs/synthetic_retinanet_lit_ti.py --mode train --batch 8
    python scripts/benchmark.py --config CFG --dtype bfloat16 --config.model.backbone_args.attention_impl=cudnn

Modes (the config's ``model`` section builds the model; random weights, synthetic inputs):
  backbone  the backbone forward in eval mode (``train=False``); outputs: the 4 stage maps.
  infer     the jitted ``detector.predict(variables, images, {'img_shape', 'scale_factor'})``.
  infer --image PATH  the whole user path on a real image at the config's test scale (``data.img_scale``):
            preprocessing as scripts/predict.py, ``jit(predict)``, the mask paste at the original size, results
            on the host; plus the same computation as separately jitted stages (preprocessing, backbone, FPN,
            dense head / RPN + proposals, RoI box head, NMS, RoI mask head, paste; ``lit_jax.benchmarking``) for a
            per-stage breakdown, and the number of XLA compilations (first call, and during the timed rounds:
            0 means no recompilation). Rounds alternate end to end / stages (/ torch forward).
  train     the jitted train step of ``lit_jax.train.trainer`` (``Trainer.init_state`` /
            ``make_train_step``: AdamW, donated state) on a synthetic batch (boxes; 56x56 mask crops for Mask R-CNN).
  train --breakdown  (Mask R-CNN) the loss + gradient split into separately compiled parts (backbone, FPN, RPN
            head: forward and forward+backward; RPN targets, proposals, RoI assign + sample, mask targets; bbox / mask
            RoIAlign and heads: forward and forward+backward; losses; ``lit_jax.benchmarking.staged_train``), timed
            with the whole ``jit(value_and_grad(loss))`` and the whole train step in alternating rounds: each part's
            median, share, FLOPs and FLOP/s, and a check that the parts composed give the whole's loss and gradients.
            ``--baseline KEY=VALUE``: a second build of the model with that config override, timed in the same rounds.

Per measurement: lower + compile time (no persistent compilation cache unless JAX_COMPILATION_CACHE_DIR is set;
recorded), warm-up steps, then ``--steps`` timed steps, each ended by ``block_until_ready``: median, p10 / p90
step time, images/s, process CPU seconds per step, peak memory (``device.memory_stats()`` where the backend has
it, else the compiled executable's ``memory_analysis()``, else the host RSS peak: the record says which), FLOPs
per image from the compiled executable's ``cost_analysis()`` and the achieved FLOP/s. XLA's cost analysis counts a
loop body once: when the attention runs over query chunks (a ``lax.map``), the FLOPs come from the same model
without chunking, lowered (recorded in ``flops_source``); data-dependent loops (NMS, RoIAlign's sample grid) are
counted once either way.

``--compare-torch`` (backbone and infer modes) also times the PyTorch reference of ``third_party/lit_torch``
(``torch.set_num_threads`` = the cores XLA uses, eval mode, ``torch.no_grad``) on the same input: random torch
weights are saved in the original layout and converted with ``lit_jax.convert``, the outputs are compared (max
relative difference printed and recorded), and JAX and torch steps alternate round by round (the order flips
every round) so that load from other processes hits both. For detectors the reference has the dense network only
(its RoI stage is a Python loop per RoI), so the comparison times the network forward (backbone + FPN + heads;
Mask R-CNN: backbone + FPN + RPN head) on both sides; ``predict`` is measured for JAX alone. The reference only
has the original architectures (LIT-Ti / LIT-S with their FPN and heads).

Each measurement appends one JSON line to ``--out`` (default ``workdir/benchmarks/results.jsonl``; ``workdir*`` is
git-ignored): device kind, jax / jaxlib (/ torch) versions, thread counts, load average, config and overrides,
mode, what was timed, size, batch, dtype, and the numbers. Config keys can be overridden with
``--config.a.b=value``; the backbone's performance switches (``attention_impl``, ``attention_query_chunk``,
``rel_bias_impl``, ``dcn_impl``, ``remat_policy``, ``mlp_token_chunk``: see ``lit_jax.models.lit.LITTi``) may be
named under ``model.backbone_args`` even where the config file does not list them.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The synthetic modes import neither tensorflow, tensorflow_datasets nor pycocotools (only the data pipeline and
# evaluation do); the config files need ml_collections (a small pure-Python wheel that travels to a GPU image).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("workdir", "benchmarks", "results.jsonl")
MODES = ("backbone", "infer", "train")

# The LIT backbone fields a benchmark may switch with --config.model.backbone_args.<name>=... (added to the config
# with their defaults when the file does not list them).
PERF_SWITCHES = ("attention_impl", "attention_query_chunk", "rel_bias_impl", "dcn_impl", "remat_policy",
                 "mlp_token_chunk")


# -- command line --------------------------------------------------------------------------------------------------
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
    args.overrides = [a for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--config.")]
    return args, config


def _add_perf_switches(config) -> None:
    """Lets ``--config.model.backbone_args.<switch>`` name the backbone's performance switches."""
    from lit_jax.models.lit import LITTi

    args = config.model.backbone_args
    for name in PERF_SWITCHES:
        if name not in args:
            args[name] = LITTi.__dataclass_fields__[name].default


def parse_size(text: Optional[str], config) -> tuple[int, int]:
    """``'800x1344'`` -> (800, 1344); None -> the first canvas of ``config.data`` (landscape)."""
    if text:
        try:
            h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: --size must be HxW (e.g. 800x1344), got {text!r}") from None
        return h, w
    from lit_jax.data.config import DataConfig

    return DataConfig.from_dict(config.data).resolved_canvases()[0]


# -- timing --------------------------------------------------------------------------------------------------------
def run_rounds(runners: dict[str, Callable[[], Any]], steps: int, warmup: int) -> dict[str, dict]:
    """Alternates the runners step by step (the order flips every round) and times each call.

    Each runner performs one step and blocks until its results are ready. Returns per runner
    ``{'warmup_s': [...], 'step_s': [...], 'cpu_s': [...]}`` (wall and process-CPU seconds per timed step).
    """
    out = {name: {"warmup_s": [], "step_s": [], "cpu_s": []} for name in runners}
    order = list(runners)
    for i in range(warmup + steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            runners[name]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if i < warmup:
                out[name]["warmup_s"].append(wall)
            else:
                out[name]["step_s"].append(wall)
                out[name]["cpu_s"].append(cpu)
    return out


def summarize(times: list[float]) -> dict[str, float]:
    """Median, p10, p90 and min of step times (linear-interpolated percentiles)."""
    import numpy as np

    t = np.asarray(times, np.float64)
    return {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)), "p90": float(np.percentile(t, 90)),
            "min": float(t.min())}


def compile_timed(jitted, *args):
    """``jitted.lower(*args).compile()`` -> (compiled, lower seconds, compile seconds)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def _cost(analysis) -> dict:
    """cost_analysis() returns a dict (or, in older jax, a list with one dict per program)."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def peak_memory(compiled) -> tuple[Optional[int], str]:
    """Peak bytes and where they come from: the device allocator, the executable's analysis, or host RSS."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device.memory_stats()['peak_bytes_in_use'] (whole process)"
    analysis = compiled.memory_analysis() if compiled is not None else None
    if analysis is not None:
        total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
                 - analysis.alias_size_in_bytes)
        return int(total), "compiled.memory_analysis(): arguments + outputs + temporaries - aliased"
    return _host_rss_peak(), "host RSS peak (ru_maxrss, whole process)"


def _host_rss_peak() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb * (1 if sys.platform == "darwin" else 1024))


# -- models --------------------------------------------------------------------------------------------------------
def backbone_args(config) -> dict:
    """``model.backbone_args`` as build_detector passes them (compute dtype from ``model.dtype``)."""
    import jax.numpy as jnp

    args = config.model.backbone_args.to_dict() if "backbone_args" in config.model else {}
    args.setdefault("dtype", {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.get("dtype", "float32")])
    return args


def chunking_active(config, hw: tuple[int, int]) -> bool:
    """Whether some attention stage runs over query chunks (a loop XLA's cost analysis counts once)."""
    from lit_jax.models.layers import resolve_query_chunk

    args = config.model.backbone_args
    if args.get("attention_impl", "einsum") != "einsum":
        return False
    chunk = resolve_query_chunk(args.get("attention_query_chunk", None))
    # Attention runs at strides 16 and 32 in both backbones; the largest grid is stride 16's.
    return bool(chunk) and (hw[0] // 16) * (hw[1] // 16) > chunk


def unchunked(config):
    """A copy of ``config`` whose attention runs without query chunks (for counting FLOPs)."""
    twin = config.copy_and_resolve_references()
    twin.model.backbone_args.attention_query_chunk = 0
    return twin


class Setup:
    """What one mode times: ``build(config)`` gives the jitted function, called as ``jitted(*args)``."""

    def __init__(self, what: str, build: Callable[[Any], Any], args: tuple, images_per_step: int):
        self.what = what
        self.build = build
        self.args = args
        self.images_per_step = images_per_step


def count_flops(compiled, build, config, hw, args: tuple) -> tuple[float, str]:
    """FLOPs per call of ``compiled`` and their source (see the module docstring about loops)."""
    if not chunking_active(config, hw):
        return float(_cost(compiled.cost_analysis()).get("flops", 0.0)), "compiled.cost_analysis()"
    # Lowered, not compiled: the pre-optimisation count is within 1% of the compiled one for the backbones
    # (308.48 vs 308.49 GFLOP LIT-Ti, 356.5 vs 353.8 LIT-S at 800x1344) and saves a second compilation.
    twin = build(unchunked(config)).lower(*args)
    return (float(_cost(twin.cost_analysis()).get("flops", 0.0)),
            "lowered cost_analysis() of the same model without attention query chunks")


def synthetic_images(rng, batch: int, hw: tuple[int, int]):
    """Normalised-looking float32 images ``(B, H, W, 3)``."""
    import numpy as np

    return rng.standard_normal((batch, hw[0], hw[1], 3)).astype(np.float32)


def setup_backbone(config, images, variables=None) -> Setup:
    """The backbone's eval forward on ``images`` ``(B, H, W, 3)`` (random init unless ``variables``)."""
    import jax
    import jax.numpy as jnp

    from lit_jax.models.registry import build_backbone

    def build(cfg):
        module = build_backbone(cfg.model.backbone, **backbone_args(cfg))
        return jax.jit(lambda v, x: module.apply(v, x, train=False))

    module = build_backbone(config.model.backbone, **backbone_args(config))
    if variables is None:  # parameter shapes do not depend on the image size
        variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3), jnp.float32))
    return Setup("backbone forward (eval)", build, (variables, jax.device_put(images)), images.shape[0])


def setup_infer(config, images, variables=None) -> Setup:
    """``detector.predict`` on ``images`` ``(B, H, W, 3)`` (img_shape = the canvas, scale_factor 1)."""
    import jax
    import numpy as np

    from lit_jax.models.registry import build_detector

    def build(cfg):
        det = build_detector(cfg.model)

        def predict(v, images, img_shape, scale_factor):
            return det.predict(v, images, {"img_shape": img_shape, "scale_factor": scale_factor})

        return jax.jit(predict)

    if variables is None:
        detector = build_detector(config.model)
        variables = jax.jit(lambda k: detector.init(k, (128, 128)))(jax.random.PRNGKey(0))  # shapes are size-free
    batch, hw = images.shape[0], images.shape[1:3]
    img_shape = jax.device_put(np.tile(np.asarray([hw], np.float32), (batch, 1)))
    scale_factor = jax.device_put(np.ones((batch, 4), np.float32))
    return Setup("detector.predict (eval, with post-processing)", build,
                 (variables, jax.device_put(images), img_shape, scale_factor), batch)


def synthetic_train_batch(rng, batch: int, hw: tuple[int, int], max_instances: int, num_classes: int,
                          keys, mask_size: int = 56) -> dict:
    """A training batch as the input pipeline gives it, restricted to ``keys``.

    images ``(B, H, W, 3)`` float32; gt_boxes ``(B, G, 4)`` float32 (x1, y1, x2, y2) inside the canvas;
    gt_labels ``(B, G)`` int32 (-1 in empty slots); gt_valid ``(B, G)`` bool (the first ~G/10, at least 1);
    img_shape, pad_shape ``(B, 2)`` int32 = (H, W); gt_masks ``(B, G, m, m)`` uint8 {0, 1} crops (m = mask_size).
    """
    import numpy as np

    h, w = hw
    g = max_instances
    xy = rng.uniform(0, 1, (batch, g, 2)) * np.asarray([w * 0.7, h * 0.7])
    wh = rng.uniform(0.05, 0.3, (batch, g, 2)) * np.asarray([w, h])
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w - 1, h - 1])], axis=-1).astype(np.float32)
    valid = np.arange(g)[None, :].repeat(batch, 0) < max(1, g // 10)
    makers = {
        "images": lambda: synthetic_images(rng, batch, hw),
        "gt_boxes": lambda: np.where(valid[..., None], boxes, 0.0).astype(np.float32),
        "gt_labels": lambda: np.where(valid, rng.integers(0, num_classes, (batch, g)), -1).astype(np.int32),
        "gt_valid": lambda: valid,
        "img_shape": lambda: np.tile(np.asarray([[h, w]], np.int32), (batch, 1)),
        "pad_shape": lambda: np.tile(np.asarray([[h, w]], np.int32), (batch, 1)),
        "gt_masks": lambda: (rng.random((batch, g, mask_size, mask_size)) < 0.5).astype(np.uint8),
    }
    unknown = sorted(set(keys) - set(makers))
    if unknown:
        raise SystemExit(f"error: the detector's train step reads batch keys {unknown} the harness cannot synthesise")
    return {k: makers[k]() for k in keys}


def setup_train(config, images, rng) -> Setup:
    """The trainer's jitted step on a synthetic batch built around ``images``; the state is carried from step to
    step (it is donated)."""
    import jax

    from lit_jax.train import sharding
    from lit_jax.train.optim import build_optimizer
    from lit_jax.train.trainer import Trainer

    batch, hw = images.shape[0], tuple(images.shape[1:3])
    config.model.pretrained = ""  # random weights
    config.data.global_batch_size = batch
    workdir = tempfile.mkdtemp(prefix="lit_jax_bench_")

    def build(cfg):
        trainer = Trainer(cfg, workdir)
        if not hasattr(trainer.detector, "loss"):
            raise SystemExit(f"error: {type(trainer.detector).__name__} has no loss() in this tree, so train mode "
                             "cannot run for it")
        schedule = trainer.learning_rate(steps_per_epoch=1000)
        tx = build_optimizer(cfg.optimizer.to_dict(), schedule)
        return trainer, tx, trainer.make_train_step(tx, schedule)

    trainer, tx, _ = build(config)
    state = trainer.init_state(tx)
    keys = getattr(trainer.detector, "train_batch_keys", ("images", "gt_boxes", "gt_labels", "gt_valid", "pad_shape"))
    host = synthetic_train_batch(rng, batch, hw, int(config.data.get("max_instances", 100)),
                                 int(config.model.num_classes), keys, int(config.data.get("mask_size", 56)))
    host["images"] = images
    data = jax.device_put(host, sharding.data_sharded(trainer.mesh))
    setup = Setup("train step (forward, backward, AdamW update; state donated)", lambda cfg: build(cfg)[2],
                  (state, data), batch)
    setup.detector = trainer.detector
    return setup


# -- the PyTorch reference -----------------------------------------------------------------------------------------
class TorchComparison:
    """The reference with the same (converted) weights, and how to compare it with JAX.

    ``torch_fn()`` runs the reference on the input (what is timed) and returns its NCHW output tensors;
    ``build_jax(config)`` gives the jitted JAX function of the same outputs, NHWC (None: the measured backbone
    forward itself); ``to_flat(out)`` flattens JAX outputs to ``(B, -1)`` numpy, as :func:`torch_flat` does.
    """

    def __init__(self, what: str, torch_fn, build_jax, to_flat, variables):
        self.what = what
        self.torch_fn = torch_fn
        self.build_jax = build_jax
        self.to_flat = to_flat
        self.variables = variables  # the converted weights; the JAX measurement uses them too


def _flat_list(outs) -> list:
    import numpy as np

    return [np.asarray(o, np.float32).reshape(o.shape[0], -1) for o in outs]


def torch_flat(outs) -> list:
    """NCHW torch tensors -> ``(B, H*W*C)`` numpy arrays in NHWC order (the order of the JAX reshapes)."""
    return [t.permute(0, 2, 3, 1).reshape(t.shape[0], -1).numpy() for t in outs]


def torch_reference(config, mode: str, images, workdir: str) -> TorchComparison:
    """Random reference weights in the original layout, converted for JAX (see the module docstring)."""
    import jax
    import torch

    from lit_jax.models.registry import build_backbone, build_detector

    name = config.model.backbone
    x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    if mode == "backbone":
        from lit_jax.convert import load_pth
        from third_party.lit_torch import save_random_checkpoint

        path = os.path.join(workdir, f"{name}_det.pth")
        ref = save_random_checkpoint(name, path, seed=0, variant="det")
        variables = _convert(lambda: load_pth(path, build_backbone(name, **backbone_args(config))), config)
        return TorchComparison("backbone forward (eval)", lambda: list(ref(x_torch)), None, _flat_list, variables)

    from lit_jax.convert.mmdet import load_mmdet_pth
    from third_party.lit_torch.save_detector import save_random_detector

    kind = f"{config.model.get('type', 'retinanet')}_{name}"
    path = os.path.join(workdir, f"{kind}.pth")
    ref = save_random_detector(kind, path, seed=0, num_classes=int(config.model.num_classes))
    variables = _convert(lambda: load_mmdet_pth(path, build_detector(config.model)), config)
    if kind.startswith("mask_rcnn"):
        def torch_fn():
            feats = ref.extract_feat(x_torch)
            logits, deltas = ref.rpn_head(feats)
            return list(feats) + list(logits) + list(deltas)

        def build_jax(cfg):
            det = build_detector(cfg.model)

            def forward(v, x):
                feats, (logits, deltas) = det.forward(v, x)
                return list(feats) + list(logits) + list(deltas)

            return jax.jit(forward)

        what = "network forward (backbone + FPN + RPN head; the reference's RoI stage is a Python loop per RoI)"
    else:
        def torch_fn():
            cls, reg = ref(x_torch)
            return list(cls) + list(reg)

        def build_jax(cfg):
            det = build_detector(cfg.model)

            def forward(v, x):
                (cls, reg), _ = det.forward(v, x)
                return list(cls) + list(reg)

            return jax.jit(forward)

        what = "network forward (backbone + FPN + RetinaHead, no post-processing)"
    return TorchComparison(what, torch_fn, build_jax, _flat_list, variables)


def _convert(load, config):
    from lit_jax.convert import ConversionError

    try:
        return load()
    except (ConversionError, ValueError) as err:
        raise SystemExit(f"error: --compare-torch needs the original architecture (the reference's shapes); "
                         f"converting the reference weights for this config failed: {err}") from None


def max_rel_diff(jax_outs, torch_outs) -> float:
    """max over outputs of ``max|jax - torch| / max|torch|``."""
    import numpy as np

    worst = 0.0
    for a, b in zip(jax_outs, torch_outs):
        a = np.asarray(a, np.float32)
        if a.shape != b.shape:
            raise AssertionError(f"output shapes differ: {a.shape} vs {b.shape}")
        worst = max(worst, float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30)))
    return worst


# -- records -------------------------------------------------------------------------------------------------------
def environment(torch_threads: Optional[int] = None) -> dict:
    import jax
    import jaxlib

    dev = jax.local_devices()[0]
    env = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git": _git_commit(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "compilation_cache": bool(jax.config.jax_compilation_cache_dir),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch_threads is not None:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch_threads)
    return env


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def record(base: dict, framework: str, what: str, timing: dict, images_per_step: int, **extra) -> dict:
    """One JSON line: the run's settings, the timing statistics and whatever ``extra`` adds."""
    stats = summarize(timing["step_s"])
    rec = dict(base, framework=framework, what=what, **{
        "step_s": stats,
        "step_times_s": [round(t, 6) for t in timing["step_s"]],
        "warmup_s": [round(t, 6) for t in timing["warmup_s"]],
        "cpu_s_median": statistics.median(timing["cpu_s"]) if timing["cpu_s"] else None,
        "images_per_s": images_per_step / stats["median"],
    })
    rec.update(extra)
    flops = rec.get("flops_per_image")
    if flops:
        rec["achieved_flops_per_s"] = flops * images_per_step / stats["median"]
        if base.get("peak_flops"):
            rec["mfu"] = rec["achieved_flops_per_s"] / base["peak_flops"]
    return rec


def append_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def _fmt_bytes(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def describe(rec: dict) -> str:
    s = rec["step_s"]
    line = (f"{rec['framework']:5s} {rec['what']}: median {s['median'] * 1e3:,.1f} ms (p10 {s['p10'] * 1e3:,.1f}, "
            f"p90 {s['p90'] * 1e3:,.1f}), {rec['images_per_s']:.3f} images/s")
    if rec.get("compile_s") is not None:
        line += f", compile {rec['compile_s']:.1f} s"
    if rec.get("flops_per_image"):
        line += f", {rec['flops_per_image'] / 1e9:,.1f} GFLOP/image, {rec['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s"
        if rec.get("mfu") is not None:
            line += f", MFU {100 * rec['mfu']:.1f}%"
    if "peak_memory_bytes" in rec:
        line += f", peak {_fmt_bytes(rec['peak_memory_bytes'])} ({rec['peak_memory_source'].split(':')[0]})"
    return line


# -- main ----------------------------------------------------------------------------------------------------------
def measure(args, config) -> list[dict]:
    """Runs the measurements the flags ask for; returns the records (also printed)."""
    if args.cores:  # before the XLA client and torch size their thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    import jax
    import numpy as np

    # --image: the canvas comes from the image and data.img_scale (measure_image).
    hw = parse_size(args.size, config) if not args.image else (0, 0)
    mode = args.mode
    batch = args.batch or (int(config.data.global_batch_size) if mode == "train" else 1)
    rng = np.random.default_rng(args.seed)
    torch_threads = None
    if args.compare_torch:
        if mode == "train":
            raise SystemExit("error: --compare-torch: the reference has no training step; use backbone or infer")
        import torch

        torch_threads = args.torch_threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(torch_threads)
    base = dict(environment(torch_threads), config=os.path.relpath(os.path.abspath(args.config), ROOT),
                overrides=args.overrides, mode=mode, model=config.model.get("type", "retinanet"),
                backbone=config.model.backbone, backbone_args=_jsonable(config.model.backbone_args.to_dict()),
                size=list(hw), batch=batch, dtype=config.model.get("dtype", "float32"), steps=args.steps,
                warmup=args.warmup, peak_flops=args.peak_flops)
    size_text = f"{hw[0]}x{hw[1]}" if not args.image else "from the image"
    print(f"{base['config']} mode={mode} size={size_text} batch={batch} dtype={base['dtype']} on "
          f"{base['device_kind']} ({base['cpu_cores']} cores, jax {base['jax']}, load {base['loadavg_1m']})",
          flush=True)

    comparison = None
    if args.baseline and not args.breakdown:
        raise SystemExit("error: --baseline is for --mode train --breakdown")
    if args.breakdown:
        if mode != "train":
            raise SystemExit("error: --breakdown is for --mode train (--mode infer --image has its own stages)")
        records = measure_train_breakdown(args, config, base, hw, batch, rng)
        append_jsonl(args.out, records)
        print(f"appended {len(records)} record(s) to {args.out}")
        return records
    if args.image:
        if mode != "infer":
            raise SystemExit("error: --image is for --mode infer")
        records = measure_image(args, config, base)
        append_jsonl(args.out, records)
        print(f"appended {len(records)} record(s) to {args.out}")
        return records
    with tempfile.TemporaryDirectory(prefix="lit_jax_bench_") as tmp:
        images = synthetic_images(rng, batch, hw)
        if args.compare_torch:
            comparison = torch_reference(config, mode, images, tmp)
        variables = comparison.variables if comparison else None
        if mode == "backbone":
            setup = setup_backbone(config, images, variables)
        elif mode == "infer":
            setup = setup_infer(config, images, variables)
        else:
            setup = setup_train(config, images, rng)

        compiled, lower_s, compile_s = compile_timed(setup.build(config), *setup.args)
        flops, flops_source = count_flops(compiled, setup.build, config, hw, setup.args)
        state = {"args": setup.args}

        def jax_step():
            out = compiled(*state["args"])
            jax.block_until_ready(out)
            if mode == "train":  # the state is donated: carry the new one
                state["args"] = (out[0],) + tuple(state["args"][1:])

        timing = run_rounds({"jax": jax_step}, args.steps, args.warmup)["jax"]
        peak, peak_source = peak_memory(compiled)
        records = [record(base, "jax", setup.what, timing, setup.images_per_step, lower_s=lower_s,
                          compile_s=lower_s + compile_s, flops_per_image=flops / setup.images_per_step,
                          flops_source=flops_source, peak_memory_bytes=peak, peak_memory_source=peak_source,
                          host_rss_peak_bytes=_host_rss_peak())]
        print(describe(records[-1]), flush=True)
        if comparison is not None:
            main = (compiled, lower_s + compile_s, flops, flops_source) if comparison.build_jax is None else None
            records += compare(comparison, config, hw, base, args, setup, main)
    append_jsonl(args.out, records)
    print(f"appended {len(records)} record(s) to {args.out}")
    return records


def measure_image(args, config, base: dict) -> list[dict]:
    """``--mode infer --image``: end to end vs the staged breakdown (vs the torch forward), alternating rounds."""
    import jax
    import numpy as np

    from lit_jax.benchmarking import CompileWatch, preprocess_bytes, staged_inference
    from lit_jax.models.registry import build_detector

    with open(args.image, "rb") as f:
        data = f.read()
    img_scale = tuple(int(v) for v in config.data.img_scale)
    images, img_shape, scale_factor, ori = preprocess_bytes(data, img_scale, name=args.image)
    base = dict(base, image=os.path.abspath(args.image), ori_shape=list(ori), size=list(images.shape[1:3]), batch=1)
    print(f"image {args.image} {ori[0]}x{ori[1]} -> canvas {images.shape[1]}x{images.shape[2]}", flush=True)
    det = build_detector(config.model)
    counter = CompileWatch()
    with tempfile.TemporaryDirectory(prefix="lit_jax_bench_") as tmp:
        comparison = torch_reference(config, "infer", images, tmp) if args.compare_torch else None
        if comparison is not None:
            variables = comparison.variables
        else:
            variables = jax.jit(lambda k: det.init(k, (128, 128)))(jax.random.PRNGKey(args.seed))
        predict = jax.jit(det.predict)

        def end_to_end():
            imgs, shape, sf, ori_hw = preprocess_bytes(data, img_scale, name=args.image)
            out = predict(variables, imgs, {"img_shape": shape, "scale_factor": sf})
            host = {k: np.asarray(getattr(out, k)[0]) for k in ("boxes", "scores", "labels", "valid")}
            if out.has_masks:
                host["masks"] = det.paste(out.mask_probs[0], out.mask_boxes[0], ori_hw, out.mask_valid[0])
            return host

        staged = staged_inference(det)
        stage_times: dict[str, list[float]] = {}

        def stages():
            t0 = time.perf_counter()
            imgs, shape, sf, ori_hw = preprocess_bytes(data, img_scale, name=args.image)
            pre = time.perf_counter() - t0
            host, times = staged.run(variables, imgs, shape, sf, ori_hw)
            for name, t in [("preprocessing", pre)] + list(times.items()):
                stage_times.setdefault(name, []).append(t)
            return host

        with counter:
            t0 = time.perf_counter()
            first = end_to_end()
            first_s = time.perf_counter() - t0
        compiles_first = counter.count
        staged_first = stages()
        stage_times.clear()
        for k in ("boxes", "scores", "valid"):  # the stages compute what predict computes
            if not np.allclose(first[k], staged_first[k], rtol=1e-4, atol=1e-3):
                print(f"warning: staged {k} differ from predict's", file=sys.stderr)
        runners = {"jax": end_to_end, "stages": stages}
        if comparison is not None:
            import torch

            def torch_step():
                with torch.no_grad():
                    comparison.torch_fn()
            runners["torch"] = torch_step
        counter.count = 0
        with counter:
            timing = run_rounds(runners, args.steps, args.warmup)
    share_total = sum(statistics.median(v) for v in stage_times.values())
    breakdown = {k: {"median_s": statistics.median(v), "share": statistics.median(v) / share_total}
                 for k, v in stage_times.items()}
    paste = " -> mask paste" if "masks" in first else ""
    what = f"end to end: image file -> preprocess -> jit(predict){paste} -> host"
    extra = dict(first_call_s=first_s, compiled_functions_first_call=compiles_first,
                 compilations_during_rounds=counter.count, stages=breakdown, stages_sum_s=share_total,
                 detections=int(first["valid"].sum()))
    recs = [record(base, "jax", what, timing["jax"], 1, **extra)]
    print(describe(recs[-1]), flush=True)
    print(f"first call {first_s:.1f} s, {compiles_first} compiled functions; {counter.count} compilations during "
          f"the timed rounds", flush=True)
    print(f"stages (separately jitted, medians; sum {share_total:.3f} s):", flush=True)
    for k, v in breakdown.items():
        print(f"  {k:18s} {v['median_s'] * 1e3:9.1f} ms  {100 * v['share']:5.1f}%", flush=True)
    if comparison is not None:
        ratio = summarize(timing["torch"]["step_s"])["median"] / recs[0]["step_s"]["median"]
        recs[0]["torch_forward_over_jax_end_to_end"] = ratio
        recs.append(record(base, "torch", comparison.what, timing["torch"], 1))
        print(describe(recs[-1]), flush=True)
        print(f"torch network forward / jax end to end (median): {ratio:.2f}x", flush=True)
    return recs


def measure_train_breakdown(args, config, base: dict, hw, batch: int, rng) -> list[dict]:
    """``--mode train --breakdown``: the parts of the Mask R-CNN loss + gradient, the whole loss + gradient and the
    whole train step, alternating rounds (``lit_jax.benchmarking.train_breakdown``); one record."""
    import jax
    import jax.numpy as jnp

    from lit_jax.benchmarking import compare_composed, format_train_breakdown, staged_train, train_breakdown

    if config.model.get("type", "retinanet") != "mask_rcnn":
        raise SystemExit(f"error: --breakdown splits the Mask R-CNN train step; {args.config} builds a "
                         f"{config.model.get('type', 'retinanet')} (time its whole train step without --breakdown)")
    setup = setup_train(config, synthetic_images(rng, batch, hw), rng)
    compiled_step, lower_s, compile_s = compile_timed(setup.build(config), *setup.args)
    state, data = setup.args
    trainer_det = setup.detector
    # The train step donates the state: the parts and the whole loss get their own copy of the variables.
    params = jax.tree_util.tree_map(jnp.copy, state.params)
    batch_stats = jax.tree_util.tree_map(jnp.copy, state.batch_stats)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)  # the train step's first key
    t0 = time.perf_counter()
    staged = staged_train(trainer_det, {"params": params, "batch_stats": batch_stats}, data, key)
    parts_compile_s = time.perf_counter() - t0
    whole, w_lower, w_compile = compile_timed(jax.jit(staged.whole()), params, batch_stats)
    whole_flops = float(_cost(whole.cost_analysis()).get("flops", 0.0))
    step_flops = float(_cost(compiled_step.cost_analysis()).get("flops", 0.0))
    baseline = None
    if args.baseline:
        import copy

        from lit_jax.config import apply_override
        from lit_jax.train.trainer import Trainer

        b_config = copy.deepcopy(config)
        for item in args.baseline:
            dotted, sep, text = item.removeprefix("--config.").partition("=")
            if not sep:
                raise SystemExit(f"error: --baseline takes KEY=VALUE, got {item!r}")
            apply_override(b_config, dotted, text)
        b_det = Trainer(b_config, tempfile.mkdtemp(prefix="lit_jax_bench_")).detector  # as the trainer builds it
        b_staged = staged_train(b_det, {"params": params, "batch_stats": batch_stats}, data, key)
        b_whole = compile_timed(jax.jit(b_staged.whole()), params, batch_stats)[0]
        baseline = (b_staged, b_whole, float(_cost(b_whole.cost_analysis()).get("flops", 0.0)))
        b_check = compare_composed(b_staged, b_whole, params, batch_stats)
        print(f"baseline ({', '.join(args.baseline)}): loss {b_check['loss']:.6f}", flush=True)
    check = compare_composed(staged, whole, params, batch_stats)
    print(f"parts composed vs the whole loss + grad: loss {check['loss']:.6f}, rel diff {check['loss_rel_diff']:.1e}; "
          f"max grad diff / max |grad| {check['grad_max_diff_rel']:.1e} (at {check['grad_worst_leaf']})", flush=True)
    carry = {"state": state}

    def step():
        new, _ = compiled_step(carry["state"], data)
        carry["state"] = jax.block_until_ready(new)

    res = train_breakdown(staged, whole, whole_flops, params, batch_stats, args.steps, args.warmup,
                          train_step=(step, step_flops), baseline=baseline)
    print(f"{len(staged.parts)} parts compiled in {parts_compile_s:.1f} s; whole loss + grad "
          f"{w_lower + w_compile:.1f} s;"
          f" train step {lower_s + compile_s:.1f} s; medians of {args.steps} alternating rounds, load now "
          f"{os.getloadavg()[0]:.2f}:", flush=True)
    for line in format_train_breakdown(res):
        print(line, flush=True)
    rec = record(base, "jax", "train step breakdown (Mask R-CNN loss + grad in separately jitted parts)",
                 {"step_s": res["whole"]["times_s"], "cpu_s": [], "warmup_s": []}, batch, breakdown=res,
                 composed_check=check, baseline_overrides=args.baseline, parts_compile_s=parts_compile_s,
                 whole_compile_s=w_lower + w_compile,
                 train_step_compile_s=lower_s + compile_s, flops_per_image=whole_flops / batch,
                 loadavg_1m_end=os.getloadavg()[0])
    return [rec]


def compare(cmp: TorchComparison, config, hw, base: dict, args, setup: Setup, main=None) -> list[dict]:
    """JAX vs torch on the same input, alternating rounds; returns the two records with the ratio.

    ``main``: ``(compiled, compile seconds, flops, flops source)`` of the measured function when the comparison
    times that same function (backbone mode); otherwise the comparison's JAX function is compiled here.
    """
    import jax
    import torch

    jax_args = setup.args[:2]  # (variables, images)
    if main is None:
        build = cmp.build_jax
        compiled, lower_s, compile_s = compile_timed(build(config), *jax_args)
        compile_total = lower_s + compile_s
        flops, flops_source = count_flops(compiled, build, config, hw, jax_args)
    else:
        compiled, compile_total, flops, flops_source = main
    jax_out = cmp.to_flat(jax.device_get(compiled(*jax_args)))
    with torch.no_grad():
        torch_out = torch_flat(cmp.torch_fn())
    diff = max_rel_diff(jax_out, torch_out)
    print(f"outputs agree: max |jax - torch| / max |torch| = {diff:.2e} (over {len(torch_out)} outputs)", flush=True)

    def jax_step():
        jax.block_until_ready(compiled(*jax_args))

    def torch_step():
        with torch.no_grad():
            cmp.torch_fn()

    timing = run_rounds({"jax": jax_step, "torch": torch_step}, args.steps, args.warmup)
    med = {k: summarize(v["step_s"])["median"] for k, v in timing.items()}
    ratio = med["torch"] / med["jax"]
    common = dict(max_rel_diff=diff, torch_over_jax=ratio, compared=True,
                  flops_per_image=flops / setup.images_per_step, flops_source=flops_source + " (JAX's count)")
    recs = [record(base, "jax", cmp.what, timing["jax"], setup.images_per_step, compile_s=compile_total, **common),
            record(base, "torch", cmp.what, timing["torch"], setup.images_per_step, **common)]
    for r in recs:
        print(describe(r), flush=True)
    print(f"torch / jax median step time: {ratio:.2f}x", flush=True)
    return recs


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (str, int, float, bool)) or d is None:
        return d
    return str(d)


def main(argv=None) -> int:
    try:
        args, config = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
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
