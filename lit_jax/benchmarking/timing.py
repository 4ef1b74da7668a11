"""Wall-clock timing: alternating rounds of runners, their summary statistics, compile time, compilation counts.

Each runner is one call that blocks until its results are ready. Runners measured together alternate step by step
(the order flips every round), so that load from other processes hits all of them alike.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np


def run_rounds(runners: dict[str, Callable[[], Any]], steps: int, warmup: int) -> dict[str, dict]:
    """Alternates the runners step by step (the order flips every round) and times each call.

    Returns per runner ``{'warmup_s': [...], 'step_s': [...], 'cpu_s': [...]}`` (wall and process-CPU seconds per
    timed step; the warm-up steps' wall seconds apart).
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


def time_rounds(runners: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """:func:`run_rounds`, keeping only the wall seconds of each runner's timed calls."""
    return {name: t["step_s"] for name, t in run_rounds(runners, rounds, warmup).items()}


def summarize(times: list[float]) -> dict[str, float]:
    """Median, p10, p90 and min of step times (linear-interpolated percentiles)."""
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


class CompileWatch:
    """Counts the jax compilations (XLA backend compiles) made while active, and the seconds spent tracing,
    lowering and compiling: ``with CompileWatch() as w: ...; w.count, w.seconds``. A cache hit counts nothing.
    The listener is registered on entry and removed on exit, so a watch can be entered again (counts add up)."""

    _COMPILE = "/jax/core/compile/backend_compile_duration"
    _EVENTS = (_COMPILE, "/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def _listen(self, event: str, duration: float, **_):
        if event in self._EVENTS:
            self.seconds += duration
            self.count += event == self._COMPILE

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
