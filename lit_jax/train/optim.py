"""Optimiser and learning-rate schedule of the original configs (``shared/parity_spec.md`` §11).

* AdamW (torch 1.7.1 semantics: decoupled decay ``p -= lr * wd * p``, bias-corrected moments,
  ``eps`` added to ``sqrt(v_hat)``) — optax's ``adamw`` computes the same update.
* LIT-S configs exempt every parameter whose name contains ``norm`` (LayerNorms, the DTM BatchNorms'
  ``norm_layer``) or ``relative_position_bias_table`` from weight decay (mmcv ``paramwise_cfg`` custom keys);
  names are matched on the torch-style dotted path (``backbone.layers_0.blocks_0.norm2.scale``).
* mmcv's step schedule with linear warmup: ``lr = base * gamma^(#milestones <= epoch)`` and, during the first
  ``warmup_iters`` iterations, ``lr * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

log = logging.getLogger(__name__)


def step_schedule_with_warmup(base_lr: float, *, steps_per_epoch: int, milestones: Sequence[int], gamma: float,
                              warmup_iters: int, warmup_ratio: float) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """mmcv ``StepLrUpdaterHook(by_epoch=True)`` with linear warmup by iteration, as a function of the step.

    ``step`` counts optimizer updates from 0; epoch = step // steps_per_epoch.
    """
    boundaries = jnp.asarray([m * steps_per_epoch for m in milestones], jnp.int32)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        lr = base_lr * gamma ** jnp.sum(step >= boundaries).astype(jnp.float32)
        if warmup_iters > 0:
            # 1 - (1 - t)(1 - r) written as r + t(1 - r): the same value, without float32 cancellation at t=0.
            factor = warmup_ratio + (step.astype(jnp.float32) / warmup_iters) * (1.0 - warmup_ratio)
            lr = jnp.where(step < warmup_iters, lr * factor, lr)
        return lr

    return schedule


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params: Any, no_decay_keywords: Sequence[str]) -> Any:
    """``True`` where weight decay applies: a parameter whose dotted name contains none of the keywords."""
    def keep(path, _):
        name = _dotted(path)
        return not any(word in name for word in no_decay_keywords)

    return jax.tree_util.tree_map_with_path(keep, params)


def _slashed(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def frozen_labels(params: Any, prefixes: Sequence[str] = (), patterns: Sequence[str] = ()) -> Any:
    """``'frozen'`` for a parameter whose ``/``-joined path (``backbone/patch_embed1/proj/kernel``) starts with one
    of ``prefixes`` or matches one of the regular expressions ``patterns`` (``re.search``), else ``'train'``."""
    import re

    compiled = [re.compile(p) for p in patterns]

    def label(path, _):
        name = _slashed(path)
        frozen = name.startswith(tuple(prefixes)) or any(c.search(name) for c in compiled)
        return "frozen" if frozen else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def build_optimizer(cfg: Mapping[str, Any], schedule: Callable, frozen: Sequence[str] = ()
                    ) -> optax.GradientTransformation:
    """AdamW (+ optional global-norm clipping) from the ``optimizer`` config section.

    Fields: ``name`` ('adamw'), ``lr`` (used by the schedule), ``weight_decay``, ``betas``, ``eps``,
    ``no_decay_keywords`` (names exempt from decay), ``grad_clip`` (None: no clipping, as the original),
    ``frozen_params`` (regular expressions of parameter paths to keep fixed).
    ``frozen``: parameter path prefixes to keep fixed (the backbone's frozen stages). Frozen parameters get a
    zero update (no weight decay either) and no optimizer state; the clipping norm is over the others.
    """
    name = cfg.get("name", "adamw")
    if name != "adamw":
        raise ValueError(f"optimizer.name={name!r} is not supported (only 'adamw', as the original)")
    b1, b2 = cfg.get("betas", (0.9, 0.999))
    keywords = tuple(cfg.get("no_decay_keywords", ()) or ())
    mask = (lambda p: decay_mask(p, keywords)) if keywords else None
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=cfg.get("eps", 1e-8), weight_decay=cfg.get("weight_decay", 1e-4),
                     mask=mask)
    clip = cfg.get("grad_clip", None)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
    patterns = tuple(cfg.get("frozen_params", ()) or ())
    if frozen or patterns:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda params: frozen_labels(params, frozen, patterns))
    return tx
