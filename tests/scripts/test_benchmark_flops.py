"""FLOP counts of chunked programs: XLA's cost analysis counts a ``lax.map`` body once, so the harness counts the
same model lowered without the backbone's query and token chunks (lit_jax.benchmarking.costs, and the backbone
parts of the train-step breakdown)."""

import os

import jax
import numpy as np
import pytest

from lit_jax.benchmarking import costs
from lit_jax.benchmarking.setups import setup_backbone, synthetic_images
from lit_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTH = os.path.join(ROOT, "configs", "synthetic_mask_rcnn_lit_ti.py")
TINY = [("model.backbone_args.depths", "(1, 1, 1, 1)")]


def _config(query_chunk, token_chunk):
    config = load_config(SYNTH, TINY)
    with config.unlocked():  # the switches are not in the config file
        config.model.backbone_args.attention_query_chunk = query_chunk
        config.model.backbone_args.mlp_token_chunk = token_chunk
    return config


def _lowered_flops(setup, config):
    return costs.flops_of(setup.build(config).lower(*setup.args))


def test_mlp_token_chunks_alone_are_counted_in_full():
    """Only the MLP runs in chunks (64 tokens; stage 1 has 2 x 16 x 24 = 768): the count is the unchunked model's,
    lowered independently here, and larger than what the chunked program's own analysis says."""
    config = _config(0, 64)
    setup = setup_backbone(config, synthetic_images(np.random.default_rng(0), 2, (64, 96)))
    compiled = setup.build(config).lower(*setup.args).compile()
    flops, source = costs.count_flops(compiled, setup.build, config, setup.args)
    want = _lowered_flops(setup, _config(0, 0))
    assert flops == pytest.approx(want, rel=1e-6) and source == costs.UNCHUNKED_SOURCE
    assert costs.flops_of(compiled) < 0.8 * want  # the undercount the twin avoids


def test_no_chunks_count_the_compiled_program():
    config = _config(0, 0)
    assert not costs.chunking_active(config) and costs.chunking_active(_config(16, 0))
    setup = setup_backbone(config, synthetic_images(np.random.default_rng(0), 1, (64, 96)))
    compiled = setup.build(config).lower(*setup.args).compile()
    flops, source = costs.count_flops(compiled, setup.build, config, setup.args)
    assert flops == costs.flops_of(compiled) > 1e8 and source == "compiled.cost_analysis()"


@pytest.mark.slow  # ~1 minute: compiles every part of the Mask R-CNN loss
def test_train_breakdown_counts_backbone_parts_without_chunk_loops():
    """staged_train(flops_det=unchunked twin): the backbone parts' FLOPs are the twin's (lowered here directly),
    not the chunked program's once-per-loop count; the parts still run the chunked detector."""
    from lit_jax.benchmarking import staged_train
    from lit_jax.benchmarking.setups import synthetic_train_batch
    from lit_jax.models.registry import build_detector

    config, twin_config = _config(8, 64), costs.unchunked(_config(8, 64))
    det, twin = build_detector(config.model), build_detector(twin_config.model)
    hw = (64, 96)
    variables = jax.jit(lambda k: det.init(k, hw))(jax.random.PRNGKey(0))
    batch = synthetic_train_batch(np.random.default_rng(0), 2, hw, 10, int(config.model.num_classes),
                                  det.train_batch_keys)
    key = jax.random.PRNGKey(1)
    staged = staged_train(det, variables, batch, key, flops_det=twin)
    plain = staged_train(det, variables, batch, key)
    parts = {p.name: p for p in staged.parts}
    params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
    images = staged.batch["images"]
    k_drop = staged.keys[0]

    def forward(d):
        return lambda p, bs, x, k: d.module.apply({"params": {"backbone": p}, "batch_stats": bs}, x,
                                                  method=lambda m, y: m.backbone(y, train=True),
                                                  mutable=["batch_stats"], rngs={"dropout": k})

    want = costs.flops_of(jax.jit(forward(twin)).lower(params, stats, images, k_drop))
    # The two lowerings of the same function differ by a few thousand FLOPs of 5e8 (5.6e-6 measured).
    assert parts["backbone fwd"].flops == pytest.approx(want, rel=1e-4)
    chunked = {p.name: p.flops for p in plain.parts}
    for name in ("backbone fwd", "backbone fwd+bwd"):
        assert parts[name].flops > 1.25 * chunked[name], name
    for name in ("FPN fwd", "mask head fwd+bwd"):  # parts without chunk loops: the same count either way
        assert parts[name].flops == chunked[name], name
