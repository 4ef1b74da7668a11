"""Elementwise detection losses on mmdet 2.x / mmcv 1.3 semantics (parity_spec.md §6, §8, §9).

Every function returns the *unreduced* loss; callers multiply by weights (or pass them here), sum and
divide by their avg factor (e.g. :func:`retinanet_normalizer`). All math is float32.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["sigmoid_focal_loss", "l1_loss", "binary_cross_entropy_with_logits",
           "softmax_cross_entropy", "retinanet_normalizer"]

FLT_MIN = np.float32(np.finfo(np.float32).tiny)  # 1.17549435e-38, C's FLT_MIN


def _focal_terms(x, t, alpha, gamma):
    """mmcv CUDA forward. x logits, t in {0, 1}; returns the unweighted per-element loss and p."""
    one = jnp.float32(1.0)
    p = one / (one + jnp.exp(-x))  # expf overflow -> p = 0, exactly like the kernel
    term_p = jnp.power(one - p, gamma) * jnp.log(jnp.maximum(p, FLT_MIN))
    term_n = jnp.power(p, gamma) * jnp.log(jnp.maximum(one - p, FLT_MIN))
    flag_p = t
    flag_n = one - t
    loss = -flag_p * jnp.float32(alpha) * term_p + -flag_n * (one - jnp.float32(alpha)) * term_n
    return loss, p


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _focal_core(x, t, alpha, gamma):
    return _focal_terms(x, t, alpha, gamma)[0]


def _focal_fwd(x, t, alpha, gamma):
    loss, p = _focal_terms(x, t, alpha, gamma)
    return loss, (p, t)


def _focal_bwd(alpha, gamma, res, g):
    # mmcv ``sigmoid_focal_loss_backward_cuda_kernel`` (analytic, finite for any logit).
    p, t = res
    one = jnp.float32(1.0)
    gam = jnp.float32(gamma)
    term_p = jnp.power(one - p, gamma) * (one - p - gam * p * jnp.log(jnp.maximum(p, FLT_MIN)))
    term_n = jnp.power(p, gamma) * (gam * (one - p) * jnp.log(jnp.maximum(one - p, FLT_MIN)) - p)
    grad = -t * jnp.float32(alpha) * term_p + -(one - t) * (one - jnp.float32(alpha)) * term_n
    return grad * g, jnp.zeros_like(t)


_focal_core.defvjp(_focal_fwd, _focal_bwd)


def sigmoid_focal_loss(logits: jnp.ndarray, targets_onehot: jnp.ndarray,
                       weights: Optional[jnp.ndarray] = None, alpha: float = 0.25,
                       gamma: float = 2.0) -> jnp.ndarray:
    """Elementwise sigmoid focal loss as mmcv's CUDA kernel (mmdet ``FocalLoss(use_sigmoid=True)``).

    With ``p = 1 / (1 + exp(-x))``:
      * target class: ``-alpha * (1 - p)^gamma * log(max(p, FLT_MIN))``;
      * other classes: ``-(1 - alpha) * p^gamma * log(max(1 - p, FLT_MIN))``.
    Background anchors have an all-zero one-hot row (mmdet label ``num_classes``).

    Args:
      logits: ``(..., C)`` raw class logits.
      targets_onehot: ``(..., C)`` 0/1 (bool or float).
      weights: optional, broadcastable to ``(..., C)`` (e.g. per-anchor ``(..., 1)``); multiplied
        after the loss as mmdet's ``weight_reduce_loss``.
      alpha, gamma: focal parameters (static Python floats).

    Returns:
      ``(..., C)`` float32 per-element loss (sum it and divide by the avg factor).

    The gradient is mmcv's analytic backward (custom VJP), which stays finite where ``exp`` overflows;
    targets get no gradient.
    """
    x = jnp.asarray(logits, jnp.float32)
    t = jnp.asarray(targets_onehot).astype(jnp.float32)
    t = jnp.broadcast_to(t, x.shape)
    loss = _focal_core(x, t, float(alpha), float(gamma))
    if weights is not None:
        loss = loss * jnp.asarray(weights, jnp.float32)
    return loss


def l1_loss(pred: jnp.ndarray, target: jnp.ndarray, weights: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Elementwise ``|pred - target| * weights`` (mmdet ``L1Loss``); shapes broadcast."""
    loss = jnp.abs(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32))
    if weights is not None:
        loss = loss * jnp.asarray(weights, jnp.float32)
    return loss


def binary_cross_entropy_with_logits(logits: jnp.ndarray, targets: jnp.ndarray,
                                     weights: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Elementwise ``F.binary_cross_entropy_with_logits(reduction='none')`` times ``weights``.

    Stable form ``max(x, 0) - x * y + log1p(exp(-|x|))``; ``targets`` may be soft (in [0, 1]).
    """
    x = jnp.asarray(logits, jnp.float32)
    y = jnp.asarray(targets).astype(jnp.float32)
    loss = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    if weights is not None:
        loss = loss * jnp.asarray(weights, jnp.float32)
    return loss


def softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                          weights: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Per-row ``F.cross_entropy(reduction='none')``: ``logsumexp(x) - x[label]``.

    Args:
      logits: ``(..., C)``.
      labels: ``(...)`` int class indices in ``[0, C)`` (mmdet RCNN: background = ``C - 1`` = 80).
      weights: optional ``(...)``.

    Returns:
      ``(...)`` float32.
    """
    x = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    logp = jax.nn.log_softmax(x, axis=-1)
    loss = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    if weights is not None:
        loss = loss * jnp.asarray(weights, jnp.float32)
    return loss


def retinanet_normalizer(num_pos_per_image: jnp.ndarray) -> jnp.ndarray:
    """mmdet ``AnchorHead`` avg factor ``sum_img max(num_pos, 1)`` as float32 ().

    ``num_pos_per_image``: ``(B,)`` counts of this device's images. Per device: no cross-device
    reduction (the original does not all-reduce it).
    """
    n = jnp.asarray(num_pos_per_image)
    return jnp.sum(jnp.maximum(n, 1)).astype(jnp.float32)


def group_sums(x: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """Per loss group sums: ``(B, ...)`` -> ``(B // group_size,)``, each the sum over ``group_size`` consecutive
    images and all trailing axes (the original's per-GPU sums; groups are then averaged, DDP's mean).

    Raises ValueError when ``B`` is not a multiple of ``group_size``.
    """
    x = jnp.asarray(x)
    b = x.shape[0]
    if b % group_size:
        raise ValueError(f"batch {b} is not a multiple of loss_group_size {group_size}")
    return jnp.sum(x.reshape((b // group_size, -1)), axis=1)
