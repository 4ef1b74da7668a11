#!/usr/bin/env python
"""End-to-end check of weight import, runnable on a fresh machine (needs the test tools: torch), from the
repository root: ``PYTHONPATH=. python scripts/demo_convert.py`` (the PyTorch reference lives in third_party/,
which is not installed with lit_jax).

For LIT-Ti and LIT-S: the PyTorch reference (third_party/lit_torch) saves a random-weight ImageNet checkpoint in
the released layout; scripts/convert_weights.py converts it to an orbax checkpoint; the converted backbone and
the reference (given the weights the original's loader would give it) run on the same non-square image, and the
per-stage agreement is printed. Exits non-zero if any stage differs by more than 1e-4 x max|reference|.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.benchmarking.torch_reference import import_lit_torch
from lit_jax.convert import load_variables
from lit_jax.convert.lit import resize_bias_table
from lit_jax.models import build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
jax.config.update("jax_default_matmul_precision", "highest")
TOL = 1e-4


def reference_detector(lit_torch, name: str, cls_state: dict):
    """The reference detection backbone loaded as the original's loaders would load the ImageNet weights."""
    import torch

    ref = lit_torch.build_model(name, "det").eval()
    target = ref.state_dict()
    state = {}
    for key, value in cls_state.items():
        if key not in target:
            continue
        if key.endswith("relative_position_bias_table") and value.shape != target[key].shape:
            side = int(round(target[key].shape[0] ** 0.5))
            value = torch.from_numpy(resize_bias_table(value.numpy(), side))
        state[key] = value
    ref.load_state_dict(state, strict=False)
    return ref


def main() -> int:
    try:
        lit_torch = import_lit_torch()
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("lit_ti", "lit_s"):
            src = os.path.join(tmp, f"{name}.pth")
            dst = os.path.join(tmp, f"{name}_jax")
            lit_torch.save_random_checkpoint(name, src, seed=0, variant="cls", nest="model")
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"),
                            "--model", name, "--src", src, "--dst", dst], check=True)
            model = build_backbone(name)
            variables = load_variables(dst)
            ref = reference_detector(lit_torch, name, torch.load(src, weights_only=True)["model"])
            images = np.random.default_rng(0).standard_normal((1, 192, 320, 3)).astype(np.float32)
            outs = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(images))
            with torch.no_grad():
                want = ref(torch.from_numpy(images).permute(0, 3, 1, 2))
            for i, (a, b) in enumerate(zip(outs, want)):
                b = b.permute(0, 2, 3, 1).numpy()
                rel = float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())
                ok &= rel <= TOL
                print(f"{name} stage {i + 1} {tuple(a.shape)}: max|diff| / max|ref| = {rel:.2e}")
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
