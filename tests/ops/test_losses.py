"""lit_jax.ops.losses against torch-op formulas and analytic values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_jax.ops.losses import (FLT_MIN, binary_cross_entropy_with_logits, l1_loss, retinanet_normalizer,
                                sigmoid_focal_loss, softmax_cross_entropy)


def ref_focal_cuda(x, labels, num_classes, alpha=0.25, gamma=2.0):
    """Transcription of mmcv's sigmoid_focal_loss_forward_cuda_kernel with torch ops (fp32)."""
    x = torch.as_tensor(x)
    t = torch.as_tensor(labels)[:, None]
    c = torch.arange(num_classes)[None, :]
    flag_p = (t == c).float()
    flag_n = (t != c).float()
    p = 1.0 / (1.0 + torch.exp(-x))
    fmin = torch.tensor(np.finfo(np.float32).tiny)
    term_p = torch.pow(1.0 - p, gamma) * torch.log(torch.max(p, fmin))
    term_n = torch.pow(p, gamma) * torch.log(torch.max(1.0 - p, fmin))
    return (-flag_p * alpha * term_p + -flag_n * (1 - alpha) * term_n).numpy()


def ref_focal_grad(x, labels, num_classes, alpha=0.25, gamma=2.0):
    """mmcv sigmoid_focal_loss_backward_cuda_kernel."""
    x = torch.as_tensor(x)
    t = torch.as_tensor(labels)[:, None]
    c = torch.arange(num_classes)[None, :]
    flag_p, flag_n = (t == c).float(), (t != c).float()
    p = 1.0 / (1.0 + torch.exp(-x))
    fmin = torch.tensor(np.finfo(np.float32).tiny)
    tp = torch.pow(1 - p, gamma) * (1 - p - gamma * p * torch.log(torch.max(p, fmin)))
    tn = torch.pow(p, gamma) * (gamma * (1 - p) * torch.log(torch.max(1 - p, fmin)) - p)
    return (-flag_p * alpha * tp + -flag_n * (1 - alpha) * tn).numpy()


def test_focal_against_cuda_formula():
    rng = np.random.default_rng(0)
    n, c = 64, 5
    x = rng.normal(0, 4, size=(n, c)).astype(np.float32)
    x[0] = [-200.0, 200.0, 0.0, 90.0, -90.0]  # saturated sigmoid: FLT_MIN clamp paths
    labels = rng.integers(0, c + 1, size=n)  # label c = background (all-zero one-hot)
    onehot = (labels[:, None] == np.arange(c)[None]).astype(np.float32)
    w = rng.uniform(0, 1, size=(n, 1)).astype(np.float32)
    got = np.asarray(jax.jit(sigmoid_focal_loss)(x, onehot, w))
    want = ref_focal_cuda(x, labels, c) * w
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert np.isfinite(got).all()
    # gradient: mmcv's analytic backward (finite even where exp overflows)
    g = np.asarray(jax.grad(lambda z: jnp.sum(sigmoid_focal_loss(z, onehot, w)))(x))
    np.testing.assert_allclose(g, ref_focal_grad(x, labels, c) * w, rtol=1e-5, atol=1e-7)
    assert np.isfinite(g).all()
    # away from saturation it matches plain autodiff of the formula
    tx = torch.tensor(x[1:], requires_grad=True)
    p = torch.sigmoid(tx)
    oh = torch.tensor(onehot[1:])
    ce = F.binary_cross_entropy_with_logits(tx, oh, reduction="none")
    pt = (1 - p) * oh + p * (1 - oh)
    loss = ce * (0.25 * oh + 0.75 * (1 - oh)) * pt.pow(2)  # mmdet py_sigmoid_focal_loss
    loss.sum().backward()
    # (the kernel's log(1 - p) loses relative precision for large |x|; compare where |x| < 6)
    m = np.abs(x[1:]) < 6
    np.testing.assert_allclose((got[1:] / w[1:])[m], loss.detach().numpy()[m], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose((g[1:] / w[1:])[m], tx.grad.numpy()[m], rtol=1e-3, atol=1e-6)


def test_focal_analytic_points():
    # x = 0: p = 1/2; positive: 0.25 * 0.25 * ln2; negative: 0.75 * 0.25 * ln2
    got = np.asarray(sigmoid_focal_loss(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]])))
    np.testing.assert_allclose(got, [[0.0625 * math.log(2), 0.1875 * math.log(2)]], rtol=1e-6)
    # RetinaNet init bias -log(99): p = 0.01 for a negative class -> 0.75 * 1e-4 * -log(0.99)
    got = float(sigmoid_focal_loss(jnp.array([[-math.log(99)]]), jnp.array([[0.0]]))[0, 0])
    np.testing.assert_allclose(got, 0.75 * 1e-4 * -math.log(0.99), rtol=1e-5)
    # saturated: p == 0 exactly for the positive class -> -alpha * log(FLT_MIN)
    got = float(sigmoid_focal_loss(jnp.array([[-1000.0]]), jnp.array([[1.0]]))[0, 0])
    np.testing.assert_allclose(got, -0.25 * math.log(float(FLT_MIN)), rtol=1e-6)


def test_l1_bce_ce():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(10, 4)).astype(np.float32)
    b = rng.normal(size=(10, 4)).astype(np.float32)
    w = (rng.uniform(size=(10, 4)) > 0.5).astype(np.float32)
    np.testing.assert_allclose(np.asarray(l1_loss(a, b, w)), np.abs(a - b) * w, rtol=1e-6)
    x = rng.normal(0, 30, size=(50,)).astype(np.float32)
    y = (rng.uniform(size=50) > 0.5).astype(np.float32)
    want = F.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y), reduction="none").numpy()
    np.testing.assert_allclose(np.asarray(binary_cross_entropy_with_logits(x, y)), want, rtol=1e-5, atol=1e-6)
    logits = rng.normal(0, 20, size=(7, 81)).astype(np.float32)
    labels = np.array([0, 80, 3, 80, 79, 5, 80])
    want = F.cross_entropy(torch.tensor(logits), torch.tensor(labels), reduction="none").numpy()
    np.testing.assert_allclose(np.asarray(softmax_cross_entropy(logits, labels)), want, rtol=1e-5, atol=1e-5)


def test_retinanet_normalizer():
    assert float(retinanet_normalizer(jnp.array([0, 5]))) == 6.0
    assert float(retinanet_normalizer(jnp.array([0, 0]))) == 2.0
    assert float(jax.jit(retinanet_normalizer)(jnp.array([3, 7]))) == 10.0


def test_group_sums_per_consecutive_images_and_bad_grouping():
    from lit_jax.ops.losses import group_sums

    x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(np.asarray(group_sums(x, 2)), [x[:2].sum(), x[2:].sum()])
    np.testing.assert_allclose(np.asarray(group_sums(x[:, 0], 4)), [x[:, 0].sum()])
    with pytest.raises(ValueError, match="not a multiple of loss_group_size 3"):
        group_sums(x, 3)
