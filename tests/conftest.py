"""Shared test setup: fp32 'highest' matmul precision so parity tolerances are meaningful on CPU."""
import os
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

# A persistent XLA compilation cache shared by the test process and the subprocesses it starts: the same small
# models are compiled by several tests (and by CLI subprocesses), which dominates the suite's time on 2 cores.
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

# Tests import the PyTorch reference from third_party/ (never a runtime dependency).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
