"""Tests for lit_jax.train.checkpoint.CheckpointStore (orbax-backed training checkpoints)."""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lit_jax.train.checkpoint import CheckpointRestoreError, CheckpointStore, CheckpointStructureError

LOGGER = "lit_jax.train.checkpoint"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# After a failed read orbax/TensorStore callbacks may still fire on a closed asyncio loop ("Event loop is
# closed", reported by pytest as unraisable, sometimes during a later test); harmless noise, restores still work.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(seed: int = 0):
    """A small train state; arrays are > 1 KiB so OCDBT keeps them in chunk files, not inline."""
    k = jax.random.key(seed)
    params = {
        "backbone": {"kernel": jax.random.normal(k, (32, 16), jnp.float32), "bias": jnp.zeros((16,), jnp.float32)},
        "head": {"kernel": jax.random.normal(jax.random.fold_in(k, 1), (16, 64), jnp.float32)},
    }
    tx = optax.adamw(1e-3)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "batch_stats": {"bn": {"mean": jnp.arange(300, dtype=jnp.float32) + seed}},
        "step": jnp.asarray(seed, jnp.int32),
        "counts": jnp.arange(512, dtype=jnp.int32) * (seed + 1),
        "rng": jax.random.key_data(jax.random.key(seed + 7)),
    }


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def fill(directory, steps, keep=5):
    with CheckpointStore(str(directory), keep=keep, async_save=False) as store:
        for s in steps:
            store.save(s, make_state(s), {"step": s})


def _state_files(step_dir, chunks_only):
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            if os.path.basename(root) == "d" or (f == "manifest.ocdbt" and not chunks_only):
                yield os.path.join(root, f)


def truncate_chunks(step_dir, chunks_only=False):
    """Halves OCDBT data files (and manifests) of the state item, as an interrupted copy would leave them."""
    paths = list(_state_files(step_dir, chunks_only))
    assert paths
    for p in paths:
        with open(p, "r+b") as fh:
            fh.truncate(os.path.getsize(p) // 2)


def delete_chunks(step_dir):
    paths = [p for p in _state_files(step_dir, True) if os.sep + "ocdbt.process_" in p]
    assert paths
    for p in paths:
        os.remove(p)


def garble_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("{garbled")


def delete_extra(step_dir):
    os.remove(os.path.join(step_dir, "extra", "metadata"))


CORRUPTIONS = {
    "truncated_files": truncate_chunks,
    "truncated_chunks_only": lambda d: truncate_chunks(d, chunks_only=True),
    "deleted_chunks": delete_chunks,
    "garbled_metadata": garble_metadata,
    "deleted_extra": delete_extra,
}


def test_round_trip_async(tmp_path):
    state = make_state(3)
    extra = {"data": {"epoch": 2, "position": 1234}, "config": {"lr": 1e-3, "sizes": [1, 2]}, "loss": 0.5}
    store = CheckpointStore(str(tmp_path / "ckpt"))  # async by default
    store.save(10, state, extra)
    store.save(20, make_state(4), {"n": 20})  # a save while the previous may still be writing
    assert store.all_steps() == [10, 20]
    store.wait()
    store.close()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["10", "20"]
    assert {"extra", "state"} <= set(os.listdir(tmp_path / "ckpt" / "10"))
    with open(tmp_path / "ckpt" / "10" / "extra" / "metadata") as f:
        assert json.load(f) == extra

    fresh = CheckpointStore(str(tmp_path / "ckpt"))
    assert fresh.latest_step() == 20
    step, restored, got_extra = fresh.restore(abstract(state), step=10)
    assert step == 10 and got_extra == extra
    assert_tree_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    # The PRNG key survives as raw key data and can be re-wrapped.
    key = jax.random.wrap_key_data(restored["rng"])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(10)))
    step, restored, got_extra = fresh.restore(state)  # concrete arrays also work as target; latest step
    assert step == 20 and got_extra == {"n": 20}
    assert_tree_equal(restored, make_state(4))
    fresh.close()


def test_typed_prng_key_and_numpy_leaves(tmp_path):
    state = {"key": jax.random.key(5), "np": np.arange(600, dtype=np.int64)}
    with CheckpointStore(str(tmp_path), async_save=False) as store:
        store.save(1, state, {})
        _, restored, _ = store.restore(state)
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
    np.testing.assert_array_equal(restored["np"], state["np"])


def test_keep_latest_and_listing(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    assert store.all_steps() == [] and store.latest_step() is None
    with pytest.raises(FileNotFoundError):
        store.restore(make_state())
    for s in (1, 2, 3, 4):
        store.save(s, make_state(s), {"s": s})
    store.wait()
    assert store.all_steps() == [3, 4]
    assert store.latest_step() == 4
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]
    with pytest.raises(ValueError, match="not newer"):
        store.save(4, make_state(), {})
    with pytest.raises(TypeError, match="JSON"):
        store.save(5, make_state(), {"bad": object()})
    with pytest.raises(FileNotFoundError, match="stored steps"):
        store.restore(make_state(), step=1)
    store.close()
    reopened = CheckpointStore(str(tmp_path), keep=2)
    assert reopened.all_steps() == [3, 4]
    reopened.close()


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back(tmp_path, caplog, corrupt):
    fill(tmp_path, [1, 2, 3])
    CORRUPTIONS[corrupt](str(tmp_path / "3"))
    target = abstract(make_state())
    with CheckpointStore(str(tmp_path)) as store:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, extra = store.restore(target)
        assert step == 2 and extra == {"step": 2}
        assert_tree_equal(restored, make_state(2))
        warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1
        msg = warnings[0].getMessage()
        assert "step 3" in msg and "falling back to step 2" in msg and "Error" in msg
        # An explicitly requested step does not fall back.
        with pytest.raises(CheckpointRestoreError, match="step 3"):
            store.restore(target, step=3)


def test_resume_after_fallback_needs_delete(tmp_path):
    fill(tmp_path, [1, 2, 3])
    truncate_chunks(str(tmp_path / "3"))
    with CheckpointStore(str(tmp_path), async_save=False) as store:
        step, _, _ = store.restore(abstract(make_state()))
        assert step == 2
        with pytest.raises(ValueError, match="not newer than the latest stored step 3"):
            store.save(3, make_state(30), {"step": 30})
        store.delete(3)
        assert store.all_steps() == [1, 2]
        store.save(3, make_state(30), {"step": 30})
        step, restored, extra = store.restore(abstract(make_state()))
    assert step == 3 and extra == {"step": 30}
    assert_tree_equal(restored, make_state(30))


def test_fallback_sets_aside_unreadable_steps_so_they_can_be_saved_again(tmp_path, caplog, monkeypatch):
    fill(tmp_path, [1, 2, 3])
    truncate_chunks(str(tmp_path / "3"))  # the manifest too: every array open of step 3 fails at once
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    caplog.set_level(logging.INFO, logger=LOGGER)
    with CheckpointStore(str(tmp_path), async_save=False) as store:
        step, _, _ = store.restore(abstract(make_state()), set_aside_unreadable=True)
        assert step == 2 and store.all_steps() == [1, 2]
        moved = [d for d in os.listdir(tmp_path) if d.startswith("3.corrupt-")]
        assert len(moved) == 1 and os.path.isdir(tmp_path / moved[0] / "state")  # kept, not deleted
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2, warnings  # the fallback and the move, nothing else (no read-only notice)
        assert "moved aside to" in warnings[1] and moved[0] in warnings[1]
        store.save(3, make_state(30), {"step": 30})
        assert any(r.getMessage() == f"checkpoint saved: step 3 -> {tmp_path / '3'}" for r in caplog.records)
        step, restored, extra = store.restore(abstract(make_state()))
    assert step == 3 and extra == {"step": 30}
    assert_tree_equal(restored, make_state(30))
    import gc

    time.sleep(0.5)  # late TensorStore callbacks would land here
    gc.collect()
    assert not [u for u in unraisable if "Event loop is closed" in str(u.exc_value)], len(unraisable)


def test_failed_background_save_is_reported_with_step_and_directory(tmp_path, caplog, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    from lit_jax.train.checkpoint import CheckpointSaveError

    async def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    store = CheckpointStore(str(tmp_path / "ckpt"))  # async: the error happens in orbax's background thread
    store.save(5, make_state(), {})
    with pytest.raises(CheckpointSaveError, match=rf"could not save checkpoint step 5 to {tmp_path / 'ckpt'}: "
                                                  r"OSError: .*No space left on device"):
        for _ in range(600):  # poll() is non-blocking; a training loop calls it once per step
            store.poll()
            time.sleep(0.05)
    store.close()  # the error was reported once; closing does not raise it again
    assert not [r for r in caplog.records if r.exc_info]  # no traceback through orbax's threads in the log


def test_all_corrupt_lists_every_step(tmp_path, caplog):
    fill(tmp_path, [1, 2, 3])
    truncate_chunks(str(tmp_path / "1"))
    garble_metadata(str(tmp_path / "2"))
    delete_extra(str(tmp_path / "3"))
    with CheckpointStore(str(tmp_path)) as store:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            with pytest.raises(CheckpointRestoreError) as info:
                store.restore(abstract(make_state()))
    msg = str(info.value)
    for s in (1, 2, 3):
        assert f"step {s}:" in msg
    assert "JSONDecodeError" in msg and "FileNotFoundError" in msg
    assert sorted(info.value.failures) == [1, 2, 3]
    assert len([r for r in caplog.records if r.name == LOGGER]) == 2  # warned for 3 and 2


def test_leftover_temporary_folder_ignored(tmp_path):
    fill(tmp_path, [1, 2])
    # What a process killed mid-save of step 3 leaves behind: a half-written, unrenamed temporary folder.
    tmp = tmp_path / "3.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "2", tmp)
    os.rename(tmp / "state", tmp / "state.orbax-checkpoint-tmp")
    for root, _, files in os.walk(tmp):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(0)
    with CheckpointStore(str(tmp_path)) as store:
        assert store.all_steps() == [1, 2]
        step, restored, extra = store.restore(abstract(make_state()))
        assert step == 2 and extra == {"step": 2}
        assert_tree_equal(restored, make_state(2))


def test_killed_mid_save_keeps_previous(tmp_path):
    """A real process dies after writing all data of step 2 but before orbax's final rename."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from lit_jax.train.checkpoint import CheckpointStore

        store = CheckpointStore(sys.argv[1], async_save=True)
        store.save(1, {{"w": jnp.full((64, 64), 1.0)}}, {{"s": 1}})
        store.wait()

        async def die(self, *a, **k):
            os._exit(17)  # killed just before the commit (rename) of step 2

        atomicity.AtomicRenameTemporaryPath.finalize = die
        store.save(2, {{"w": jnp.full((64, 64), 2.0)}}, {{"s": 2}})
        store.wait()
        os._exit(0)
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]
    target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    with CheckpointStore(str(tmp_path), async_save=False) as store:
        assert store.all_steps() == [1]
        step, restored, extra = store.restore(target)
        assert step == 1 and extra == {"s": 1}
        np.testing.assert_array_equal(np.asarray(restored["w"]), 1.0)
        # Saving step 2 again replaces the stale temporary folder.
        store.save(2, {"w": jnp.full((64, 64), 3.0)}, {"s": 2})
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_structure_mismatch_is_a_clear_error(tmp_path):
    fill(tmp_path, [1])
    target = abstract(make_state())
    extra_leaf = dict(target, ema={"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    missing_leaf = {k: v for k, v in target.items() if k != "counts"}
    reshaped = dict(target, params=dict(target["params"], head={"kernel": jax.ShapeDtypeStruct((16, 80), jnp.float32)}))
    with CheckpointStore(str(tmp_path)) as store:
        with pytest.raises(CheckpointStructureError, match=r"in target but not in checkpoint: ema/w"):
            store.restore(extra_leaf)
        with pytest.raises(CheckpointStructureError, match=r"in checkpoint but not in target: counts"):
            store.restore(missing_leaf)
        with pytest.raises(CheckpointStructureError, match=r"params/head/kernel: checkpoint \(16, 64\) vs target \(16, 80\)"):
            store.restore(reshaped)
        with pytest.raises(CheckpointStructureError, match=r"opt_state"):
            store.restore(dict(target, opt_state=optax.sgd(0.1, momentum=0.9).init(make_state()["params"])))
        # Dtypes may differ: orbax casts.
        cast = dict(target, counts=jax.ShapeDtypeStruct((512,), jnp.float32))
        _, restored, _ = store.restore(cast)
        assert restored["counts"].dtype == jnp.float32


def test_restore_honours_target_sharding(tmp_path):
    fill(tmp_path, [1])
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, P())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), make_state())
    with CheckpointStore(str(tmp_path)) as store:
        _, restored, _ = store.restore(target)
    for leaf in jax.tree.leaves(restored):
        assert isinstance(leaf, jax.Array)
        assert leaf.sharding == replicated
    assert_tree_equal(restored, make_state(1))
