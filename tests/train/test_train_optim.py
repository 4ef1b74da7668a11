"""Optimiser and schedule against the original's formulas (torch AdamW, mmcv step + linear warmup)."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from lit_jax.train.optim import build_optimizer, decay_mask, step_schedule_with_warmup


def _mmcv_lr(it, base, steps_per_epoch, milestones, gamma, warmup_iters, ratio):
    """mmcv StepLrUpdaterHook(by_epoch) + linear warmup, written from its definition."""
    epoch = it // steps_per_epoch
    regular = base * gamma ** sum(1 for m in milestones if epoch >= m)
    if it < warmup_iters:
        k = (1 - it / warmup_iters) * (1 - ratio)
        return regular * (1 - k)
    return regular


def test_schedule_matches_mmcv():
    sched = step_schedule_with_warmup(1e-4, steps_per_epoch=100, milestones=(8, 11), gamma=0.1,
                                      warmup_iters=500, warmup_ratio=0.001)
    for it in [0, 1, 250, 499, 500, 501, 799, 800, 801, 1099, 1100, 1199]:
        np.testing.assert_allclose(float(sched(it)), _mmcv_lr(it, 1e-4, 100, (8, 11), 0.1, 500, 0.001), rtol=1e-6)
    assert float(sched(0)) == pytest.approx(1e-7)


def test_decay_mask_exempts_norms_and_tables():
    params = {"backbone": {"layers_0": {"blocks_0": {"norm2": {"scale": 0, "bias": 0}, "mlp": {"fc1": {"kernel": 0}}},
                                         "downsample": {"norm_layer": {"scale": 0}, "dconv": {"kernel": 0}}},
                           "layers_2": {"blocks_0": {"attn": {"relative_position_bias_table": 0, "qkv": {"bias": 0}}}},
                           "patch_embed": {"norm": {"scale": 0}}},
              "neck": {"fpn_convs_0": {"conv": {"kernel": 0}}}}
    mask = decay_mask(params, ("norm", "relative_position_bias_table"))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat == {
        "backbone/layers_0/blocks_0/norm2/scale": False, "backbone/layers_0/blocks_0/norm2/bias": False,
        "backbone/layers_0/blocks_0/mlp/fc1/kernel": True, "backbone/layers_0/downsample/norm_layer/scale": False,
        "backbone/layers_0/downsample/dconv/kernel": True,
        "backbone/layers_2/blocks_0/attn/relative_position_bias_table": False,
        "backbone/layers_2/blocks_0/attn/qkv/bias": True, "backbone/patch_embed/norm/scale": False,
        "neck/fpn_convs_0/conv/kernel": True,
    }


def test_adamw_matches_torch_with_decay_exemptions():
    """Five steps of our AdamW (with a no-decay name) equal torch.optim.AdamW with two param groups."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    n0 = rng.standard_normal((4,)).astype(np.float32)
    grads = [(rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32))
             for _ in range(5)]
    lr = lambda step: 1e-2 * (1 + step)  # noqa: E731 - a changing lr exercises the schedule hook-up
    tx = build_optimizer({"lr": 1e-2, "weight_decay": 0.05, "betas": (0.9, 0.999), "eps": 1e-8,
                          "no_decay_keywords": ("norm",)}, lr)
    params = {"fc": {"kernel": jnp.asarray(w0)}, "norm": {"scale": jnp.asarray(n0)}}
    state = tx.init(params)
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    tn = torch.nn.Parameter(torch.from_numpy(n0.copy()))
    opt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.05}, {"params": [tn], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for step, (gw, gn) in enumerate(grads):
        updates, state = tx.update({"fc": {"kernel": jnp.asarray(gw)}, "norm": {"scale": jnp.asarray(gn)}},
                                   state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        for group in opt.param_groups:
            group["lr"] = lr(step)
        tw.grad, tn.grad = torch.from_numpy(gw), torch.from_numpy(gn)
        opt.step()
    np.testing.assert_allclose(np.asarray(params["fc"]["kernel"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["norm"]["scale"]), tn.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer({"name": "sgd", "lr": 0.1}, lambda s: 0.1)
