"""The JSON records of a benchmark run: the environment, one record per measurement, the JSONL file, the line
printed per record."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Optional

import jax
import jaxlib

from lit_jax.benchmarking.timing import summarize

# The source tree this package runs from (an editable install, or PYTHONPATH=. at the repository root): records
# name the config relative to it and carry its git commit.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_settings(args, config, hw: tuple[int, int], batch: int, torch_threads: Optional[int]) -> dict:
    """The fields every record of a run shares: :func:`environment`, the config (path relative to the repository)
    and its overrides, mode, model, backbone switches, size, batch, dtype, steps, warm-up, peak FLOP/s."""
    return dict(environment(torch_threads), config=os.path.relpath(os.path.abspath(args.config), REPO_ROOT),
                overrides=args.overrides, mode=args.mode, model=config.model.get("type", "retinanet"),
                backbone=config.model.backbone, backbone_args=_jsonable(config.model.backbone_args.to_dict()),
                size=list(hw), batch=batch, dtype=config.model.get("dtype", "float32"), steps=args.steps,
                warmup=args.warmup, peak_flops=args.peak_flops)


def environment(torch_threads: Optional[int] = None) -> dict:
    """The machine and software a measurement ran on: device, versions, cores, XLA flags, load, git commit."""
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
        out = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
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
    """Appends one JSON line per record to ``path`` (its folder created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def _fmt_bytes(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def describe(rec: dict) -> str:
    """The one line printed per record: median (p10, p90) step time, images/s, compile time, FLOPs, peak memory."""
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


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (str, int, float, bool)) or d is None:
        return d
    return str(d)
