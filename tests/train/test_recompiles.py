"""The jitted train step compiles exactly once per canvas bucket over a real (tiny, synthetic-data) training run.

The data pipeline pads every image to one of two canvases (landscape and portrait), so a run must compile the
train step twice and never again: a third compile would mean something in the state or the batch (a dtype, a
weak type, a sharding, a shape) changes from step to step. Counted with the jitted function's executable cache,
wrapped around ``Trainer.make_train_step``. Evaluation's logged compile count (``Trainer.last_eval_speed``) is
checked against the distinct padded shapes of both evaluation modes.
"""

import os

import pytest

from lit_jax import main as main_mod
from lit_jax.config import load_config, split_overrides
from lit_jax.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTH = os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py")
STEPS = 6  # one epoch of 12 images at batch 2: both buckets appear (asserted below)


def _tiny_config(data_root, *extra):
    _, overrides = split_overrides([
        f"--config.synthetic.root={data_root}", "--config.synthetic.train=12", "--config.synthetic.val=2",
        "--config.synthetic.max_side=96", "--config.data.img_scale=(96, 64)", "--config.data.global_batch_size=2",
        "--config.data.shuffle_buffer=16", "--config.model.backbone_args.embed_dims=(8, 16, 16, 16)",
        "--config.model.backbone_args.depths=(1, 1, 1, 1)", "--config.model.backbone_args.num_heads=(1, 1, 1, 1)",
        "--config.model.fpn_channels=16", "--config.model.head.feat_channels=16",
        "--config.model.head.stacked_convs=1", "--config.train.eval_every_epochs=0",
        f"--config.train.max_steps={STEPS}", f"--config.train.checkpoint_every_steps={STEPS}", *extra,
    ])
    config = load_config(SYNTH, overrides)
    main_mod.ensure_synthetic_dataset(config)
    return config


class _StepSpy:
    """Calls the jitted train step and records the canvas ``(H, W)`` of every batch it is given."""

    def __init__(self, jitted):
        self.jitted = jitted
        self.canvases = []

    def __call__(self, state, batch):
        self.canvases.append(tuple(batch["images"].shape[1:3]))
        return self.jitted(state, batch)

    def compiles(self) -> int:
        return self.jitted._cache_size()  # executables held by this jitted function: one per signature


def test_train_step_compiles_once_per_canvas_bucket(tmp_path, monkeypatch):
    config = _tiny_config(str(tmp_path / "data"))
    spies = []
    make = Trainer.make_train_step

    def spying_make_train_step(self, tx, schedule):
        spies.append(_StepSpy(make(self, tx, schedule)))
        return spies[-1]

    monkeypatch.setattr(Trainer, "make_train_step", spying_make_train_step)
    Trainer(config, str(tmp_path / "run")).train(final_eval=False)

    assert len(spies) == 1
    spy = spies[0]
    assert len(spy.canvases) == STEPS
    buckets = sorted(set(spy.canvases))
    assert buckets == [(64, 96), (96, 64)], f"the run should use both canvases, got {spy.canvases}"
    # Steps of each bucket come back more than once, so a recompile on the second visit would show.
    assert all(spy.canvases.count(c) >= 2 for c in buckets), spy.canvases
    assert spy.compiles() == len(buckets) == 2, (
        f"{spy.compiles()} compilations of the train step for {len(buckets)} canvas buckets over {STEPS} steps")


def test_the_counter_sees_an_extra_compile():
    """The executable cache really counts compilations: a new input signature adds one."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: x * 2)
    f(jnp.zeros((2, 3)))
    f(jnp.ones((2, 3)))
    assert f._cache_size() == 1
    f(jnp.zeros((3, 2)))
    f(jnp.zeros((2, 3), jnp.int32))
    assert f._cache_size() == 3


def test_compile_watch_counts_new_shapes_only():
    import jax
    import jax.numpy as jnp

    from lit_jax.benchmarking import CompileWatch

    f = jax.jit(lambda x: x * 2)
    a, b, c, d = jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((3, 2)), jnp.zeros((4, 2))  # eager ops compile too
    with CompileWatch() as w:
        f(a)
        f(b)
        f(c)
    assert w.count == 2 and w.seconds > 0
    f(d)  # after the block: not counted
    assert w.count == 2


@pytest.mark.parametrize("mode", ["per_image", "bucket"])
def test_evaluation_compiles_once_per_padded_shape(tmp_path, mode):
    """The evaluation log's compile count (jax.monitoring) equals the distinct padded batch shapes: several in
    per_image mode (each image at its own 32-padded size), at most the two canvases in bucket mode."""
    import jax

    # 96-pixel images scaled up to 320x192: landscape, portrait and odd aspect ratios pad to different shapes.
    config = _tiny_config(str(tmp_path / "data"), "--config.synthetic.val=6", "--config.data.img_scale=(320, 192)",
                          "--config.data.eval_global_batch_size=2", f"--config.eval.mode={mode}")
    trainer = Trainer(config, str(tmp_path / "run"))
    canvas = trainer.data_cfg.resolved_canvases()[0]
    variables = jax.jit(lambda k: trainer.detector.init(k, canvas))(jax.random.PRNGKey(0))
    trainer.evaluate(variables)
    speed = trainer.last_eval_speed
    assert speed["mode"] == mode and speed["images"] == 6
    assert speed["compiles"] == speed["shapes"], speed
    if mode == "per_image":
        assert speed["shapes"] >= 2, speed  # the synthetic images differ in size: a count of 1 would prove nothing
    else:
        assert 1 <= speed["shapes"] <= 2, speed
    assert 0 < speed["compile_seconds"] < speed["seconds"]


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
