"""What a benchmark mode times, on synthetic inputs: the backbone forward, ``detector.predict``, the train step.

Each ``setup_*`` returns a :class:`Setup`: a ``build(config)`` that gives the jitted function (called again on a
modified config to count FLOPs, see :mod:`lit_jax.benchmarking.costs`) and the arguments it is timed on. Weights
are random; the synthetic images and training batches have the shapes and dtypes of the input pipeline's.
"""
from __future__ import annotations

import tempfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Setup:
    """What one mode times: ``jitted(*args)``, the function ``build(config)`` gave for the setup's config
    (``build`` is kept to build it again from a modified config); ``what`` says what it computes; ``detector``:
    the detector whose loss the train step differentiates (train mode)."""

    def __init__(self, what: str, build: Callable[[Any], Any], jitted, args: tuple, images_per_step: int,
                 detector=None):
        self.what = what
        self.build = build
        self.jitted = jitted
        self.args = args
        self.images_per_step = images_per_step
        self.detector = detector


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


def backbone_args(config) -> dict:
    """``model.backbone_args`` as build_detector passes them (compute dtype from ``model.dtype``)."""
    args = config.model.backbone_args.to_dict() if "backbone_args" in config.model else {}
    args.setdefault("dtype", {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.get("dtype", "float32")])
    return args


def synthetic_images(rng, batch: int, hw: tuple[int, int]):
    """Normalised-looking float32 images ``(B, H, W, 3)``."""
    return rng.standard_normal((batch, hw[0], hw[1], 3)).astype(np.float32)


def setup_backbone(config, images, variables=None) -> Setup:
    """The backbone's eval forward on ``images`` ``(B, H, W, 3)`` (random init unless ``variables``)."""
    from lit_jax.models.registry import build_backbone

    def module_of(cfg):
        return build_backbone(cfg.model.backbone, **backbone_args(cfg))

    def build(cfg):
        module = module_of(cfg)
        return jax.jit(lambda v, x: module.apply(v, x, train=False))

    if variables is None:  # parameter shapes do not depend on the image size
        variables = jax.jit(module_of(config).init)(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3), jnp.float32))
    return Setup("backbone forward (eval)", build, build(config), (variables, jax.device_put(images)),
                 images.shape[0])


def setup_infer(config, images, variables=None) -> Setup:
    """``detector.predict`` on ``images`` ``(B, H, W, 3)`` (img_shape = the canvas, scale_factor 1)."""
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
    return Setup("detector.predict (eval, with post-processing)", build, build(config),
                 (variables, jax.device_put(images), img_shape, scale_factor), batch)


def synthetic_train_batch(rng, batch: int, hw: tuple[int, int], max_instances: int, num_classes: int,
                          keys, mask_size: int = 56) -> dict:
    """A training batch as the input pipeline gives it, restricted to ``keys``.

    images ``(B, H, W, 3)`` float32; gt_boxes ``(B, G, 4)`` float32 (x1, y1, x2, y2) inside the canvas;
    gt_labels ``(B, G)`` int32 (-1 in empty slots); gt_valid ``(B, G)`` bool (the first ~G/10, at least 1);
    img_shape, pad_shape ``(B, 2)`` int32 = (H, W); gt_masks ``(B, G, m, m)`` uint8 {0, 1} crops (m = mask_size).
    """
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

    trainer, tx, step = build(config)
    state = trainer.init_state(tx)
    keys = getattr(trainer.detector, "train_batch_keys", ("images", "gt_boxes", "gt_labels", "gt_valid", "pad_shape"))
    host = synthetic_train_batch(rng, batch, hw, int(config.data.get("max_instances", 100)),
                                 int(config.model.num_classes), keys, int(config.data.get("mask_size", 56)))
    host["images"] = images
    data = jax.device_put(host, sharding.data_sharded(trainer.mesh))
    return Setup("train step (forward, backward, AdamW update; state donated)", lambda cfg: build(cfg)[2], step,
                 (state, data), batch, detector=trainer.detector)
