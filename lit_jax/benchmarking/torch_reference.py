"""The PyTorch reference (``third_party/lit_torch``) on the same input and weights as JAX, for ``--compare-torch``.

Random torch weights are saved in the original layout and converted with ``lit_jax.convert``, so that both sides
compute the same function. For detectors the reference has the dense network only (its RoI stage is a Python loop
per RoI), so the comparison is the network forward (backbone + FPN + heads; Mask R-CNN: backbone + FPN + RPN
head). The reference only has the original architectures (LIT-Ti / LIT-S with their FPN and heads).

``third_party`` is not an installed package and torch is a test-only tool: both are imported inside the functions
here, through :func:`import_lit_torch`, which says how to make them importable.
"""
from __future__ import annotations

import importlib
import os

import jax
import numpy as np

from lit_jax.benchmarking.setups import backbone_args

REFERENCE_MISSING = (
    "the PyTorch reference (third_party.lit_torch) lives in the source tree's third_party/, which is not installed "
    "with lit_jax: run from the repository root with PYTHONPATH=. (PYTHONPATH=. python scripts/...); torch is a "
    "test-only tool, installed by scripts/setup_env.sh")


def import_lit_torch():
    """The module ``third_party.lit_torch`` (it imports torch); an ImportError saying where it lives if it cannot
    be imported."""
    try:
        return importlib.import_module("third_party.lit_torch")
    except ImportError as err:
        raise ImportError(f"{REFERENCE_MISSING} ({type(err).__name__}: {err})") from err


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
    return [np.asarray(o, np.float32).reshape(o.shape[0], -1) for o in outs]


def torch_flat(outs) -> list:
    """NCHW torch tensors -> ``(B, H*W*C)`` numpy arrays in NHWC order (the order of the JAX reshapes)."""
    return [t.permute(0, 2, 3, 1).reshape(t.shape[0], -1).numpy() for t in outs]


def torch_reference(config, mode: str, images, workdir: str) -> TorchComparison:
    """The reference of ``config``'s model with random weights in the original layout, and those weights converted
    for JAX (see the module docstring); ``images`` ``(B, H, W, 3)`` float32."""
    lit_torch = import_lit_torch()
    import torch

    from lit_jax.models.registry import build_backbone, build_detector

    name = config.model.backbone
    x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    if mode == "backbone":
        from lit_jax.convert import load_pth

        path = os.path.join(workdir, f"{name}_det.pth")
        ref = lit_torch.save_random_checkpoint(name, path, seed=0, variant="det")
        variables = _convert(lambda: load_pth(path, build_backbone(name, **backbone_args(config))), config)
        return TorchComparison("backbone forward (eval)", lambda: list(ref(x_torch)), None, _flat_list, variables)

    from lit_jax.convert.mmdet import load_mmdet_pth

    kind = f"{config.model.get('type', 'retinanet')}_{name}"
    path = os.path.join(workdir, f"{kind}.pth")
    ref = lit_torch.save_random_detector(kind, path, seed=0, num_classes=int(config.model.num_classes))
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
    worst = 0.0
    for a, b in zip(jax_outs, torch_outs):
        a = np.asarray(a, np.float32)
        if a.shape != b.shape:
            raise AssertionError(f"output shapes differ: {a.shape} vs {b.shape}")
        worst = max(worst, float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30)))
    return worst
