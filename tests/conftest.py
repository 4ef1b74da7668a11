"""Shared test setup: fp32 'highest' matmul precision so parity tolerances are meaningful on CPU."""
import os
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

# Tests import the PyTorch reference from third_party/ (never a runtime dependency).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
