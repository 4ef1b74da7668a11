"""LIT backbone behaviour beyond eval parity: sizes, parameter counts, BatchNorm, drop path, remat, freezing."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from lit_jax.models import build_backbone
from lit_jax.models.layers import BatchNorm, relative_position_index

# Small variants keep compile times low where the behaviour under test does not depend on depth or width.
SMALL = {
    "lit_ti": dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2)),
    "lit_s": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
}


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,expected", [("lit_ti", 19_371_736), ("lit_s", 27_966_192)])
def test_parameter_counts_match_the_original(name, expected):
    """The original's detection backbones (spec §13: numel over state_dict without BN buffers)."""
    module = build_backbone(name)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    assert _count(shapes["params"]) == expected


@pytest.mark.parametrize("name,channels", [("lit_ti", (64, 128, 320, 512)), ("lit_s", (96, 192, 384, 768))])
def test_output_shapes_non_square(name, channels):
    module = build_backbone(name)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 96, 160, 3)))
    outs = jax.eval_shape(lambda v, x: module.apply(v, x), shapes, jnp.zeros((2, 96, 160, 3)))
    assert [o.shape for o in outs] == [(2, 96 // s, 160 // s, c) for s, c in zip((4, 8, 16, 32), channels)]


def test_build_backbone_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown backbone 'lit_x'"):
        build_backbone("lit_x")
    with pytest.raises(ValueError, match="depthz"):
        build_backbone("lit_ti", depthz=(1, 1, 1, 1))


def test_relative_position_index_matches_formula():
    h, w = 3, 5
    idx = relative_position_index((h, w))
    for a in range(h * w):
        for b in range(h * w):
            ha, wa, hb, wb = a // w, a % w, b // w, b % w
            assert idx[a, b] == (ha - hb + h - 1) * (2 * w - 1) + (wa - wb + w - 1)


def test_batchnorm_train_step_matches_torch():
    """Batch statistics (biased) for the output, unbiased variance in the running update, momentum 0.1."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 3, 6)).astype(np.float32) * 3 + 1
    ref = torch.nn.BatchNorm2d(6, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.standard_normal(6).astype(np.float32)))
        ref.bias.copy_(torch.from_numpy(rng.standard_normal(6).astype(np.float32)))
    ref.train()
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    bn = BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x), use_running_average=True)
    variables = {
        "params": {"scale": jnp.asarray(ref.weight.detach().numpy()), "bias": jnp.asarray(ref.bias.detach().numpy())},
        "batch_stats": variables["batch_stats"],
    }
    got, updates = bn.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["mean"]), ref.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["var"]), ref.running_var.numpy(), rtol=1e-5)


def test_batchnorm_groups_normalise_each_group_on_its_own():
    """group_size=2 on a batch of 4 equals two separate batches of 2 (the original's per-GPU statistics)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 3, 5, 2)).astype(np.float32))
    x = x.at[2:].multiply(5.0)
    grouped = BatchNorm(group_size=2)
    plain = BatchNorm()
    variables = plain.init(jax.random.PRNGKey(0), x, use_running_average=True)
    got, _ = grouped.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    first, _ = plain.apply(variables, x[:2], use_running_average=False, mutable=["batch_stats"])
    second, _ = plain.apply(variables, x[2:], use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got), np.concatenate([first, second]), atol=1e-6)
    whole, _ = plain.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    assert np.abs(np.asarray(whole) - np.asarray(got)).max() > 1e-2


@pytest.mark.parametrize("name", ["lit_ti", "lit_s"])
def test_train_mode_updates_batch_stats_and_drop_path_is_random(name):
    module = build_backbone(name, drop_path_rate=0.5, **SMALL[name])
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 64, 96, 3)).astype(np.float32))
    variables = module.init(jax.random.PRNGKey(0), x)
    apply = jax.jit(lambda v, x, k: module.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k}))
    out_a, upd = apply(variables, x, jax.random.PRNGKey(1))
    out_b, _ = apply(variables, x, jax.random.PRNGKey(2))
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3 for a, b in zip(out_a, out_b))
    before = jax.tree_util.tree_leaves(variables["batch_stats"])
    after = jax.tree_util.tree_leaves(upd["batch_stats"])
    assert all(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(before, after))
    # Eval mode is deterministic and needs no RNG.
    e1 = module.apply(variables, x)
    e2 = module.apply(variables, x)
    assert all(np.array_equal(a, b) for a, b in zip(e1, e2))


# The original's flag, and the remat_policy choices (the policies beyond one per backbone are in the slow set).
REMAT = [
    pytest.param(name, args, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in args.items())}", marks=marks)
    for name in ("lit_ti", "lit_s")
    for args, marks in [
        # LIT-S remat stays in the default suite through dots_with_no_batch_dims_saveable (~30 s each on 2 cores)
        (dict(use_checkpoint=True), () if name == "lit_ti" else pytest.mark.slow),
        (dict(remat_policy="dots_with_no_batch_dims_saveable"), () if name == "lit_s" else pytest.mark.slow),
        (dict(remat_policy="dots_saveable"), pytest.mark.slow),
    ]
]


def _assert_same_values_and_gradients(plain, other, x):
    variables = plain.init(jax.random.PRNGKey(0), x)
    # A fixed random projection of the outputs: sum(o**2) would be degenerate behind LIT-S's output LayerNorms
    # (sum of LN(x)**2 over channels is ~C whatever x), leaving round-off noise as the gradient of earlier layers.
    shapes = jax.eval_shape(lambda v: plain.apply(v, x), variables)
    rng = np.random.default_rng(4)
    weights = [jnp.asarray(rng.standard_normal(o.shape).astype(np.float32)) for o in shapes]

    def loss(module):
        def f(params):
            outs = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
            return sum(jnp.sum(o * r) for o, r in zip(outs, weights))
        return jax.jit(jax.value_and_grad(f))(variables["params"])

    (v1, g1), (v2, g2) = loss(plain), loss(other)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    # Recomputation or chunking may fuse differently, so allow float32 round-off relative to each gradient's scale.
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * max(np.abs(np.asarray(a)).max(), 1e-6)


@pytest.mark.parametrize("name,remat_args", REMAT)
def test_use_checkpoint_gives_the_same_values_and_gradients(name, remat_args):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 64, 64, 3)).astype(np.float32))
    _assert_same_values_and_gradients(build_backbone(name, **SMALL[name]),
                                      build_backbone(name, **remat_args, **SMALL[name]), x)


@pytest.mark.parametrize("name", ["lit_ti", pytest.param("lit_s", marks=pytest.mark.slow)])
def test_mlp_token_chunks_give_the_same_values_and_gradients(name):
    """LayerNorm + MLP over chunks of 100 tokens (2 x 16x16 stage-1 tokens: 6 chunks, the last one padded) against
    all tokens at once; the parameter trees are the same, so a converted checkpoint fits either."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 64, 3)).astype(np.float32))
    plain = build_backbone(name, mlp_token_chunk=0, **SMALL[name])
    chunked = build_backbone(name, mlp_token_chunk=100, **SMALL[name])
    shapes = [jax.eval_shape(m.init, jax.random.PRNGKey(0), x) for m in (plain, chunked)]
    assert jax.tree_util.tree_structure(shapes[0]) == jax.tree_util.tree_structure(shapes[1])
    variables = plain.init(jax.random.PRNGKey(0), x)
    loops = [str(jax.make_jaxpr(lambda v: m.apply(v, x))(variables)).count("scan[") for m in (plain, chunked)]
    assert loops[1] - loops[0] == 2  # the one block of stage 1 and of stage 2 (stage 3 has 32 tokens)
    _assert_same_values_and_gradients(plain, chunked, x)


@pytest.mark.parametrize("name", ["lit_ti", "lit_s"])
def test_frozen_stages_get_no_gradient_and_keep_their_statistics(name):
    """frozen_stages=1 (mmdet convention): the patch embedding and stage 1 are frozen, the rest trains."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 64, 64, 3)).astype(np.float32))
    module = build_backbone(name, frozen_stages=1, **SMALL[name])
    variables = module.init(jax.random.PRNGKey(0), x)

    def f(params):
        outs, upd = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.PRNGKey(0)},
        )
        return sum(jnp.sum(o**2) for o in outs), upd

    grads, upd = jax.jit(jax.grad(f, has_aux=True))(variables["params"])
    if name == "lit_ti":
        frozen = ["patch_embed1", "pos_embed1", "block1_0"]
        trained = ["patch_embed2", "pos_embed2", "block2_0", "block4_0"]
        frozen_bn, trained_bn = None, "patch_embed2"
    else:
        frozen = ["patch_embed", "layers_0"]  # layers_0 holds stage 1's blocks and the DTM after it
        trained = ["layers_1", "layers_3", "norm1"]
        frozen_bn, trained_bn = "layers_0", "layers_1"
    for key in frozen:
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grads[key])), key
    for key in trained:
        assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(grads[key])), key
    stats, new_stats = variables["batch_stats"], upd["batch_stats"]
    if frozen_bn:
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, stats[frozen_bn], new_stats[frozen_bn]))
    assert not jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, stats[trained_bn], new_stats[trained_bn]))


@pytest.mark.slow  # 22 s of compilation; test_lit_parity's bf16 test checks bf16 against the reference (slow too)
def test_bfloat16_compute_stays_close_to_float32():
    name = "lit_s"
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 64, 96, 3)).astype(np.float32))
    f32 = build_backbone(name, **SMALL[name])
    bf16 = build_backbone(name, dtype=jnp.bfloat16, **SMALL[name])
    variables = f32.init(jax.random.PRNGKey(0), x)
    a = f32.apply(variables, x)
    b = bf16.apply(variables, x)
    for o32, o16 in zip(a, b):
        assert o16.dtype == jnp.bfloat16
        rel = np.abs(np.asarray(o16, np.float32) - np.asarray(o32)).max() / np.abs(np.asarray(o32)).max()
        assert rel < 5e-2


def test_negative_chunk_sizes_are_refused_by_name():
    from lit_jax.models.layers import resolve_query_chunk, resolve_token_chunk

    for resolve in (resolve_query_chunk, resolve_token_chunk):
        with pytest.raises(ValueError, match="mlp_token_chunk must be >= 0|must be >= 0"):
            resolve(-3)
        assert resolve(0) == 0 and resolve(5) == 5
