"""Worker for tests/train/test_train_distributed.py: runs train steps of a small RetinaNet on a fixed batch.

    python sharded_step_worker.py devices OUT.npz          # all local devices (the test sets 8 CPU devices)
    python sharded_step_worker.py process OUT.npz I N PORT # process I of N via jax.distributed on localhost
    python sharded_step_worker.py by_hand OUT.npz          # 1 device, each 2-image shard by hand (reference)

Writes the parameters after STEPS steps (and the first step's loss) to OUT.npz.
"""

import os
import sys

import numpy as np

MODE, OUT = sys.argv[1], sys.argv[2]
if MODE == "process":
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[5]}", num_processes=int(sys.argv[4]),
                               process_id=int(sys.argv[3]))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lit_jax.models import build_detector  # noqa: E402
from lit_jax.train import sharding  # noqa: E402
from lit_jax.train.trainer import TrainState, build_train_step  # noqa: E402

GLOBAL_BATCH, GROUP, STEPS, CANVAS = 16, 2, 2, (64, 96)
MODEL = {
    "type": "retinanet", "backbone": "lit_ti", "num_classes": 3, "fpn_channels": 16,
    "backbone_args": {"embed_dims": (8, 16, 16, 16), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1),
                      "drop_path_rate": 0.0, "bn_group_size": GROUP},
    "head": {"feat_channels": 16, "stacked_convs": 1},
    "train_test": {"loss_group_size": GROUP},
}


def global_batch():
    rng = np.random.default_rng(0)
    b = GLOBAL_BATCH
    boxes = np.zeros((b, 3, 4), np.float32)
    x1 = rng.uniform(0, 50, (b, 3)); y1 = rng.uniform(0, 30, (b, 3))
    boxes[..., 0], boxes[..., 1] = x1, y1
    boxes[..., 2], boxes[..., 3] = x1 + rng.uniform(12, 45, (b, 3)), y1 + rng.uniform(12, 33, (b, 3))
    valid = rng.uniform(size=(b, 3)) < 0.7
    valid[:, 0] = True
    return {
        "images": rng.standard_normal((b,) + CANVAS + (3,)).astype(np.float32),
        "gt_boxes": boxes, "gt_labels": rng.integers(0, 3, (b, 3)).astype(np.int32), "gt_valid": valid,
        "pad_shape": np.tile(np.asarray([CANVAS], np.int32), (b, 1)),
    }


def initial_state(det, tx):
    variables = det.init(jax.random.PRNGKey(0), CANVAS)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                      rng=jax.random.key_data(jax.random.PRNGKey(1)))


def main():
    det = build_detector(MODEL)
    schedule = lambda step: 1e-3  # noqa: E731
    # eps 1e-4 (not 1e-8): with a tiny eps Adam turns float32 round-off in near-zero gradient components into
    # lr-sized sign flips, which would hide what this test compares (the distribution semantics).
    tx = optax.adamw(schedule, eps=1e-4, weight_decay=1e-4)
    batch = global_batch()
    losses = []
    if MODE in ("devices", "process"):
        mesh = sharding.make_mesh()
        step_fn = build_train_step(det, tx, schedule, mesh)
        state = jax.device_put(initial_state(det, tx), sharding.replicated(mesh))
        shard = sharding.data_sharded(mesh)
        n, i = jax.process_count(), jax.process_index()
        local = {k: v[i * GLOBAL_BATCH // n:(i + 1) * GLOBAL_BATCH // n] for k, v in batch.items()}
        gbatch = {k: jax.make_array_from_process_local_data(shard, v) for k, v in local.items()}
        for _ in range(STEPS):
            state, metrics = step_fn(state, gbatch)
            losses.append(float(metrics["loss"]))
        params = state.params
    else:  # by hand: each 2-image shard is one "GPU": its own loss, BN statistics; gradients averaged
        state = initial_state(det, tx)

        @jax.jit
        def shard_grad(params, batch_stats, one, rng):
            return jax.value_and_grad(
                lambda p: det.loss({"params": p, "batch_stats": batch_stats}, one, rng), has_aux=True)(params)

        for step in range(STEPS):
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            grads, stats, shard_losses = [], [], []
            for s in range(0, GLOBAL_BATCH, GROUP):
                one = {k: jnp.asarray(v[s:s + GROUP]) for k, v in batch.items()}
                (loss, aux), g = shard_grad(state.params, state.batch_stats, one, rng)
                grads.append(g)
                stats.append(aux["batch_stats"])
                shard_losses.append(float(loss))
            mean = lambda trees: jax.tree_util.tree_map(lambda *x: sum(x) / len(x), *trees)  # noqa: E731
            updates, opt_state = tx.update(mean(grads), state.opt_state, state.params)
            state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  batch_stats=mean(stats), opt_state=opt_state)
            losses.append(float(np.mean(shard_losses)))
        params = state.params
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(sharding.to_host(v) if MODE != "by_hand" else v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if jax.process_index() == 0:
        np.savez(OUT, losses=np.asarray(losses), **flat)


main()
