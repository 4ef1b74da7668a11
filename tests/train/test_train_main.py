"""The training entry point end to end on a tiny synthetic dataset and a shrunken LIT-Ti RetinaNet.

Resume after a checkpoint equals an uninterrupted run; a non-finite update stops with the step and keeps the last
good checkpoint; bad config keys and a missing dataset give clear errors; eval_coco.py agrees with pycocotools
on its own results file and takes a released-style mmdet checkpoint with --pth.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

import jax
import jax.numpy as jnp

from lit_jax import main as main_mod
from lit_jax.config import load_config, split_overrides
from lit_jax.train.checkpoint import CheckpointStore
from lit_jax.train.trainer import NonFiniteLossError, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTH = os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py")


def tiny_overrides(data_root):
    return [
        f"--config.synthetic.root={data_root}", "--config.synthetic.train=12", "--config.synthetic.val=6",
        "--config.synthetic.max_side=96", "--config.data.img_scale=(96, 64)", "--config.data.global_batch_size=2",
        "--config.data.eval_global_batch_size=2", "--config.data.shuffle_buffer=16",
        "--config.model.backbone_args.embed_dims=(8, 16, 16, 16)", "--config.model.backbone_args.depths=(1, 1, 1, 1)",
        "--config.model.backbone_args.num_heads=(1, 1, 1, 1)", "--config.model.fpn_channels=16",
        "--config.model.head.feat_channels=16", "--config.model.head.stacked_convs=1",
        "--config.train.log_every_steps=1", "--config.train.eval_every_epochs=0",
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic_data"))


def _config(data_root, *extra):
    _, overrides = split_overrides(tiny_overrides(data_root) + list(extra))
    config = load_config(SYNTH, overrides)
    main_mod.ensure_synthetic_dataset(config)
    return config


def _params(workdir, config):
    trainer = Trainer(config, workdir)
    return trainer.load_variables(checkpoint=workdir)["params"]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A workdir trained 4 steps with checkpoints at steps 2 and 4 (shared: copy it before changing it)."""
    workdir = str(tmp_path_factory.mktemp("trained") / "w")
    Trainer(_config(data_root, "--config.train.max_steps=4", "--config.train.checkpoint_every_steps=2"),
            workdir).train(final_eval=False)
    return workdir


def _stored_params(workdir, step):
    with CheckpointStore(os.path.join(workdir, "checkpoints")) as store:
        return store.restore(None, step=step)[1]["params"]


def _max_diff(a, b):
    return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


def test_resume_after_a_checkpoint_equals_an_uninterrupted_run(data_root, trained, tmp_path):
    straight, resumed = trained, str(tmp_path / "resumed")
    # "Interrupted" after the step-2 checkpoint, then started again with the same command.
    Trainer(_config(data_root, "--config.train.max_steps=2", "--config.train.checkpoint_every_steps=2"),
            resumed).train(final_eval=False)
    assert CheckpointStore(os.path.join(resumed, "checkpoints")).all_steps() == [2]
    Trainer(_config(data_root, "--config.train.max_steps=4", "--config.train.checkpoint_every_steps=2"),
            resumed).train(final_eval=False)
    config = _config(data_root)
    assert _max_diff(_params(straight, config), _params(resumed, config)) <= 1e-6
    # And the step-2 -> 4 continuation really trained: the parameters moved from step 2 and from the init.
    assert CheckpointStore(os.path.join(straight, "checkpoints")).all_steps() == [2, 4]
    from lit_jax.train.optim import build_optimizer

    trainer = Trainer(config, str(tmp_path / "init"))
    init = trainer.init_state(build_optimizer(config.optimizer.to_dict(), trainer.learning_rate(1))).params
    step2, step4 = _stored_params(straight, 2), _stored_params(straight, 4)
    assert _max_diff(step2, step4) > 1e-6 and _max_diff(init, step2) > 1e-6


def test_non_finite_update_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    workdir = str(tmp_path / "nan")
    config = _config(data_root, "--config.train.max_steps=6", "--config.train.checkpoint_every_steps=1")
    trainer = Trainer(config, workdir)
    # A learning rate that turns NaN after two steps: step 3's update is non-finite.
    trainer.learning_rate = lambda steps_per_epoch: (lambda step: jnp.where(step < 2, 1e-3, jnp.nan))
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*last good checkpoint: step 2"):
        trainer.train(final_eval=False)
    store = CheckpointStore(os.path.join(workdir, "checkpoints"))
    assert store.all_steps()[-1] == 2
    params = _params(workdir, config)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params))


def test_damaged_latest_checkpoint_is_moved_aside_and_training_goes_on(data_root, trained, tmp_path, caplog):
    import shutil

    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    state_files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpt, "4", "state")) for f in fs]
    largest = max(state_files, key=os.path.getsize)
    os.truncate(largest, 100)
    config = _config(data_root, "--config.train.max_steps=6", "--config.train.checkpoint_every_steps=2")
    # Resumed from step 2, the first step after it (3) goes non-finite: the kept checkpoint is step 2, not the
    # unreadable step 4. (A stand-in train step: nothing to compile, the loss is NaN.)
    trainer = Trainer(config, workdir)
    nan = {"loss": jnp.nan, "grad_norm": jnp.nan, "update_norm": jnp.nan}
    trainer.make_train_step = lambda tx, schedule: (lambda state, batch: (state, nan))
    with caplog.at_level(logging.WARNING, logger="lit_jax.train.checkpoint"):
        with pytest.raises(NonFiniteLossError, match=r"at step 3 .*last good checkpoint: step 2 "):
            trainer.train(final_eval=False)
    moved = [d for d in os.listdir(ckpt) if d.startswith("4.corrupt-")]
    assert len(moved) == 1 and os.path.isfile(os.path.join(ckpt, moved[0], "state", os.path.relpath(
        largest, os.path.join(ckpt, "4", "state"))))
    assert [r for r in caplog.records if "moved aside" in r.getMessage()]
    # The next run saves step 4 again and goes past it; a further run resumes from its last step.
    Trainer(config, workdir).train(final_eval=False)
    assert CheckpointStore(ckpt).all_steps() == [2, 4, 6]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        state = Trainer(config, workdir).train(final_eval=False)
    assert int(state.step) == 6 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_bad_config_values_are_refused_before_training(tmp_path, capsys):
    for override, named in [("--config.optimizer.grad_clip=-1", "'optimizer.grad_clip' = -1.0"),
                            ("--config.train.checkpoint_every_steps=0", "'train.checkpoint_every_steps' = 0"),
                            ("--config.optimizer.lr=0", "'optimizer.lr' = 0.0"),
                            ("--config.data.global_batch_size=-2", "'data.global_batch_size' = -2"),
                            ("--config.schedule.epochs=0", "'schedule.epochs' = 0"),
                            ("--config.eval.mode=per-image", "'eval.mode' = 'per-image'")]:
        data = tmp_path / "never_generated"
        rc = main_mod.main(["--config", SYNTH, "--workdir", str(tmp_path / "w"), f"--config.synthetic.root={data}",
                            override])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: config key ") and named in err[0], err
        assert not os.path.exists(data) and not os.path.exists(tmp_path / "w")  # nothing was built or written
    from lit_jax.config import ConfigError, validate_config

    config = load_config(SYNTH)
    config.optimizer.grad_clip = None  # None and 0 switch clipping off
    validate_config(config)
    config.optimizer.grad_clip = float("nan")
    with pytest.raises(ConfigError, match="grad_clip"):
        validate_config(config)


def test_class_count_mismatch_is_refused_before_training(data_root, tmp_path, capsys):
    workdir = tmp_path / "w"
    rc = main_mod.main(["--config", SYNTH, "--workdir", str(workdir), "--mode", "train",
                        "--config.model.num_classes=3"] + tiny_overrides(data_root))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "coco_instances/synthetic" in err[0] and "6 categories" in err[0] and "model.num_classes is 3" in err[0]
    assert not os.path.exists(workdir / "checkpoints")


def test_failed_checkpoint_save_stops_training_with_one_error_line(data_root, tmp_path, capsys, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    async def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    # A stand-in train step (nothing to compile): the save path is what is tested here.
    ok = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0), "update_norm": jnp.float32(1.0)}
    monkeypatch.setattr(Trainer, "make_train_step", lambda self, tx, schedule: (lambda state, batch: (state, ok)))
    workdir = tmp_path / "w"
    rc = main_mod.main(["--config", SYNTH, "--workdir", str(workdir), "--mode", "train"] + tiny_overrides(data_root)
                       + ["--config.train.max_steps=3", "--config.train.checkpoint_every_steps=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 4 and err == [f"error: could not save checkpoint step 1 to {workdir / 'checkpoints'}: OSError: "
                               "[Errno 28] No space left on device"], err


def test_unknown_config_key_and_missing_dataset_are_clear_errors(tmp_path, capsys):
    rc = main_mod.main(["--config", SYNTH, "--workdir", str(tmp_path), "--config.optimizer.lrr=1"])
    assert rc == 2
    assert "unknown config key 'optimizer.lrr'" in capsys.readouterr().err
    coco = os.path.join(ROOT, "configs", "retinanet_lit_ti_fpn_1x_coco.py")
    rc = main_mod.main(["--config", coco, "--workdir", str(tmp_path / "w"), f"--config.data.data_dir={tmp_path}/none",
                        "--config.model.pretrained="])
    err = capsys.readouterr().err
    assert rc == 2 and "coco_instances" in err and "prepare" in err, err


def _run_script(args, timeout=600):
    run = subprocess.run([sys.executable] + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def test_eval_script_equals_pycocotools_on_its_results(data_root, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    workdir = str(tmp_path / "train")
    Trainer(_config(data_root, "--config.train.max_steps=2", "--config.train.checkpoint_every_steps=2"),
            workdir).train(final_eval=False)
    out = str(tmp_path / "results.json")
    # Two steps leave every score near the 0.01 prior: lower the threshold so there are detections to score.
    stdout = _run_script([os.path.join("scripts", "eval_coco.py"), "--config", SYNTH, "--checkpoint", workdir,
                          "--out", out, "--config.model.train_test.score_thr=0.001"] + tiny_overrides(data_root))
    reported = json.loads(stdout[stdout.index("{"):])
    results = json.load(open(out))
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    from lit_jax.data.sources import open_source
    from lit_jax.train.trainer import annotation_file

    config = _config(data_root)
    gt = COCO(annotation_file(open_source(config.data.data_dir, config.data.dataset), "val"))
    ev = COCOeval(gt, gt.loadRes(out), "bbox")
    ev.params.maxDets = [100, 300, 1000]  # mmdet 2.11's setting
    ev.evaluate(); ev.accumulate(); ev.summarize()
    assert reported["bbox_mAP"] == pytest.approx(round(ev.stats[0], 3), abs=1e-9)
    assert reported["bbox_mAP_50"] == pytest.approx(round(ev.stats[1], 3), abs=1e-9)
    again = _run_script([os.path.join("scripts", "eval_coco.py"), "--config", SYNTH, "--results_only", out]
                        + tiny_overrides(data_root))
    assert json.loads(again[again.index("{"):]) == reported


def test_eval_script_takes_a_released_style_mmdet_checkpoint(data_root, tmp_path):
    """A random RetinaNet LIT-Ti saved in the mmdet layout goes through eval_coco.py --pth, no manual step."""
    from third_party.lit_torch.save_detector import save_random_detector

    pth = str(tmp_path / "retinanet_lit_ti_released.pth")
    save_random_detector("retinanet_lit_ti", pth, seed=0, num_classes=6)
    full = ["--config.model.fpn_channels=256", "--config.model.head.feat_channels=256",
            "--config.model.head.stacked_convs=4", "--config.model.backbone_args.embed_dims=(64, 128, 320, 512)",
            "--config.model.backbone_args.depths=(3, 4, 6, 3)", "--config.model.backbone_args.num_heads=(1, 2, 5, 8)"]
    stdout = _run_script([os.path.join("scripts", "eval_coco.py"), "--config", SYNTH, "--pth", pth,
                          "--out", str(tmp_path / "res.json")] + tiny_overrides(data_root) + full)
    stats = json.loads(stdout[stdout.index("{"):])
    assert "bbox_mAP" in stats and os.path.isfile(tmp_path / "res.json")


def test_predict_script_draws_detections(data_root, tmp_path):
    workdir = str(tmp_path / "train")
    Trainer(_config(data_root, "--config.train.max_steps=1", "--config.train.checkpoint_every_steps=1"),
            workdir).train(final_eval=False)
    config = _config(data_root)
    from lit_jax.data.sources import open_source
    from lit_jax.train.trainer import annotation_file

    ann = annotation_file(open_source(config.data.data_dir, config.data.dataset), "val")
    images = json.load(open(ann))["images"]
    image = os.path.join(os.path.dirname(os.path.dirname(ann)), "val2017", images[0]["file_name"])
    out_dir = str(tmp_path / "drawn")
    stdout = _run_script([os.path.join("scripts", "predict.py"), "--config", SYNTH, "--weights", workdir,
                          "--input", image, "--out-dir", out_dir, "--score_thr", "0.0"] + tiny_overrides(data_root))
    import cv2

    drawn = cv2.imread(os.path.join(out_dir, os.path.splitext(images[0]["file_name"])[0] + ".png"))
    assert drawn.shape[:2] == (images[0]["height"], images[0]["width"])
    assert "1 images in" in stdout


def test_prefetching_iterator_yields_the_same_batches_and_saves_exact_positions(data_root, tmp_path):
    """prefetch=2 gives the batches of an unprefetched read, pauses at checkpoint steps so the saved tf.data
    position is exact, and a resumed prefetching iterator continues with the next batch."""
    import numpy as np

    from lit_jax.data.pipeline import DataConfig, make_train_dataset
    from lit_jax.train import sharding
    from lit_jax.train.trainer import DataIterator

    config = _config(data_root)
    mesh = sharding.make_mesh()

    def ids(it, n):
        return [np.asarray(next(it)["image_id"]).tolist() for _ in range(n)]

    plain = DataIterator(make_train_dataset(DataConfig.from_dict(config.data)), mesh, str(tmp_path / "a"))
    want = ids(plain, 6)
    pre = DataIterator(make_train_dataset(DataConfig.from_dict(config.data)), mesh, str(tmp_path / "b"),
                       prefetch=2, checkpoint_every=3, total_steps=6)
    got = ids(pre, 3)
    pre.save(3)
    got += ids(pre, 1)
    import time

    deadline = time.time() + 30
    while pre._produced <= pre._consumed and time.time() < deadline:  # let the thread read ahead
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="consumed"):  # a save off the announced steps is refused
        pre.save(4)
    pre.close()
    resumed = DataIterator(make_train_dataset(DataConfig.from_dict(config.data)), mesh, str(tmp_path / "b"),
                           prefetch=2, start_step=3, checkpoint_every=3, total_steps=6)
    resumed.restore(3)
    got += ids(resumed, 2)
    resumed.close()
    assert got[:4] == want[:4] and got[4:] == want[3:5]


def test_prefetch_thread_ends_on_close_while_waiting_on_a_full_queue(tmp_path):
    """close() stops a producer that is waiting to put into a full queue (its timed put raises queue.Full, which
    is the only error that loop handles), and the thread is gone."""
    import time
    import types

    import numpy as np
    import tensorflow as tf

    from lit_jax.train import sharding
    from lit_jax.train.trainer import DataIterator

    ds = tf.data.Dataset.from_tensor_slices({"image_id": np.arange(64, dtype=np.int64).reshape(32, 2)}).repeat()
    it = DataIterator(types.SimpleNamespace(dataset=ds), sharding.make_mesh(), str(tmp_path), prefetch=1)
    assert np.asarray(next(it)["image_id"]).tolist() == [0, 1]
    deadline = time.time() + 30
    while it._produced < 3 and time.time() < deadline:  # batch 2 fills the one slot; batch 3 waits on it
        time.sleep(0.05)
    assert it._produced == 3 and it._queue.full()
    time.sleep(1.2)  # two or more timed puts of batch 3 have failed with queue.Full: the producer is still waiting
    assert it._thread.is_alive()
    assert [np.asarray(next(it)["image_id"]).tolist() for _ in range(2)] == [[2, 3], [4, 5]]
    deadline = time.time() + 30
    while it._produced < 5 and time.time() < deadline:
        time.sleep(0.05)
    it.close()
    assert not it._thread.is_alive()
