"""Fine-tuning: model.load_from a released-layout 80-class detector (random weights saved by the PyTorch reference)
on a 3-class dataset of the user's own, frozen stages that stay bitwise fixed under AdamW's weight decay, and
the config-override rule for free-form sections."""

import json
import os

import numpy as np
import pytest

import flax
import jax

from lit_jax.config import ConfigError, load_config, split_overrides
from lit_jax.convert.mmdet import load_mmdet_pth
from lit_jax.data import coco_builder
from lit_jax.train.checkpoint import CheckpointStore
from lit_jax.train.trainer import Trainer
from tests.train.finetune_data import make_three_class_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {"retinanet": "retinanet_lit_ti_fpn_1x_coco.py", "mask_rcnn": "mask_rcnn_lit_ti_fpn_1x_coco.py"}
# One 96x96 canvas for training, evaluation and prediction: one compilation of each on the full-size model.
SMALL = ["--config.data.img_scale=(96, 64)", "--config.data.canvases=((96, 96),)", "--config.eval.mode=bucket", "--config.data.global_batch_size=2",
         "--config.data.eval_global_batch_size=2", "--config.data.shuffle_buffer=16", "--config.model.pretrained=",
         "--config.train.log_every_steps=1", "--config.train.eval_every_epochs=0", "--config.eval.show_num=0",
         "--config.schedule.warmup_iters=0"]
MASK_RCNN_SMALL = ["--config.model.train_test.rcnn_num_samples=32", "--config.model.train_test.rpn_train_nms_pre=100",
                   "--config.model.train_test.rpn_train_max_per_img=50", "--config.model.train_test.rpn_nms_pre=100",
                   "--config.model.train_test.rpn_max_per_img=50", "--config.model.train_test.score_thr=0.001"]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("my_data"))
    names = make_three_class_folder(root)
    tfds_dir = os.path.join(root, "tfds")
    coco_builder.build(root, tfds_dir, "my_data", splits=[("train", "train.json", "images"),
                                                          ("val", "val.json", "images")])
    return tfds_dir, names


def _config(kind, *extra):
    _, overrides = split_overrides(SMALL + (MASK_RCNN_SMALL if kind == "mask_rcnn" else []) + list(extra))
    return load_config(os.path.join(ROOT, "configs", CONFIGS[kind]), overrides)


def _flat(tree):
    return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.mark.parametrize("kind", ["retinanet", pytest.param("mask_rcnn", marks=pytest.mark.slow)])
def test_finetune_a_released_80_class_detector_on_3_classes(kind, three_classes, tmp_path):
    from third_party.lit_torch.save_detector import save_random_detector

    tfds_dir, names = three_classes
    pth = str(tmp_path / f"{kind}_lit_ti_released.pth")
    save_random_detector(f"{kind}_lit_ti", pth, seed=2)
    data = [f"--config.data.data_dir={tfds_dir}", "--config.data.dataset=coco_instances/my_data"]
    config = _config(kind, *data, f"--config.model.load_from={pth}", "--config.model.num_classes=3",
                     "--config.train.max_steps=2", "--config.train.checkpoint_every_steps=2")
    workdir = str(tmp_path / "run")
    trainer = Trainer(config, workdir)

    # Step 0: every source tensor but the class layers, exactly; the class layers as a fresh initialisation.
    from lit_jax.train.optim import build_optimizer

    state = trainer.init_state(build_optimizer(config.optimizer.to_dict(), lambda s: 1e-4))
    source = load_mmdet_pth(pth, _source_model(kind))
    got, want = _flat(state.params), _flat(source["params"])
    canvas = trainer.data_cfg.resolved_canvases()[0]  # the trainer's own initialisation (jitted, seed 0)
    fresh = _flat(jax.jit(lambda k: trainer.detector.init(k, canvas))(jax.random.split(jax.random.PRNGKey(0))[0])
                  ["params"])
    class_layers = [k for k in got if any(k.startswith(p + "/") for p in trainer.detector.class_layers)]
    assert len(class_layers) == 2 * len(trainer.detector.class_layers)  # kernel and bias of each
    for k, v in got.items():
        if k in class_layers:
            assert v.shape != want[k].shape
            np.testing.assert_array_equal(v, fresh[k])
        else:
            np.testing.assert_array_equal(v, want[k], err_msg=k)
    assert any(k.startswith("backbone/") for k in got) and any(k.startswith("neck/") for k in got)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(_flat(state.batch_stats))[0]),
                                  np.asarray(jax.tree.leaves(_flat(source["batch_stats"]))[0]))

    # It trains, evaluates, and its predictions carry the dataset's 3 class names.
    trainer.train(final_eval=True)
    lines = [json.loads(x) for x in open(os.path.join(workdir, "eval_results.jsonl"))]
    assert "bbox_mAP" in lines[-1]
    from lit_jax.inference import load_detector

    det = load_detector(config, workdir, canvas="bucket")
    assert det.class_names == names
    images = sorted(os.listdir(os.path.join(os.path.dirname(tfds_dir), "images")))
    (r,) = det(os.path.join(os.path.dirname(tfds_dir), "images", images[0]), score_thr=0.0)
    assert set(r.names) <= set(names) and set(r.labels.tolist()) <= {0, 1, 2}


def _source_model(kind):
    from lit_jax.models import build_detector

    return build_detector({"type": kind, "backbone": "lit_ti"})


def test_load_from_with_80_classes_on_a_3_class_dataset_stops_before_the_first_step(three_classes, tmp_path):
    tfds_dir, _ = three_classes
    config = _config("retinanet", f"--config.data.data_dir={tfds_dir}", "--config.data.dataset=coco_instances/my_data",
                     "--config.model.load_from=/not/read/because/the/check/comes/first.pth")
    with pytest.raises(ValueError, match=r"my_data has 3 categories but model.num_classes is 80"):
        Trainer(config, str(tmp_path / "run")).train()
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_load_from_and_pretrained_together_is_an_error():
    from lit_jax.config import validate_config

    config = _config("retinanet", "--config.model.load_from=a.pth", "--config.model.pretrained=weights/lit_ti")
    with pytest.raises(ConfigError, match="load_from.*pretrained.*both set"):
        validate_config(config)


def test_frozen_stages_stay_bitwise_fixed_under_adamw_weight_decay(tmp_path):
    """frozen_stages=2 (stage 1 and stage 2 with its token merging, whose BatchNorm has statistics): 20 AdamW
    steps with weight decay 0.05 leave those parameters and statistics bitwise unchanged; the rest moves."""
    from tests.train.test_train_main import tiny_overrides

    data_root = str(tmp_path / "data")
    workdir = str(tmp_path / "run")
    from lit_jax import main as main_mod

    rc = main_mod.main(["--config", os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py"), "--workdir",
                        workdir, "--mode", "train", "--config.model.backbone_args.frozen_stages=2",
                        "--config.optimizer.weight_decay=0.05", "--config.optimizer.lr=1e-3",
                        "--config.train.max_steps=20", "--config.train.checkpoint_every_steps=20",
                        "--config.schedule.warmup_iters=0"] + tiny_overrides(data_root))
    assert rc == 0
    _, overrides = split_overrides(tiny_overrides(data_root) + ["--config.model.backbone_args.frozen_stages=2"])
    config = load_config(os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py"), overrides)
    main_mod.ensure_synthetic_dataset(config, generate=False)
    trainer = Trainer(config, workdir)
    from lit_jax.train.optim import build_optimizer

    tx = build_optimizer(config.optimizer.to_dict(), lambda s: 1e-3, frozen=trainer.frozen_parameters())
    init = trainer.init_state(tx)
    with CheckpointStore(os.path.join(workdir, "checkpoints")) as store:
        _, final, _ = store.restore(init)
    frozen = ("backbone/patch_embed1/", "backbone/pos_embed1", "backbone/block1_", "backbone/patch_embed2/",
              "backbone/pos_embed2", "backbone/block2_")
    assert tuple(sorted(trainer.frozen_parameters())) == tuple(sorted(frozen))
    before, after = _flat(init.params), _flat(final.params)
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    for k in before:
        if k.startswith(frozen):
            assert k not in moved, f"{k} changed although frozen"
    assert len([k for k in moved if not k.startswith(frozen)]) == len([k for k in before if not k.startswith(frozen)])
    stats_before, stats_after = _flat(init.batch_stats), _flat(final.batch_stats)
    for k in stats_before:
        same = np.array_equal(stats_before[k], stats_after[k])
        assert same == k.startswith("backbone/patch_embed2/"), k  # frozen stage 2's BatchNorm only


def test_new_keys_only_in_free_form_sections():
    path = os.path.join(ROOT, "configs", "retinanet_lit_ti_fpn_1x_coco.py")
    config = load_config(path, [("model.backbone_args.frozen_stages", "1"), ("model.head.stacked_convs", "2")])
    assert config.model.backbone_args.frozen_stages == 1 and config.model.head.stacked_convs == 2
    with pytest.raises(ConfigError, match="did you mean 'optimizer.grad_clip'"):
        load_config(path, [("optimizer.gradclip", "1.0")])
    # A typo inside a free-form section is added, then named by the constructor that reads it.
    from lit_jax.models.registry import build_detector

    config = load_config(path, [("model.backbone_args.frozen_stage", "1")])
    with pytest.raises(ValueError, match="frozen_stage"):
        build_detector(config)


@pytest.mark.parametrize("env,want", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "4"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, "tpu_pod"),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, None),
    ({"JOB_COMPLETION_INDEX": "0", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "kubernetes"),
    ({"JOB_COMPLETION_INDEX": "0"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "SLURM_NTASKS": "4"}, "explicit"),
])
def test_multi_process_launchers_are_recognised(env, want):
    from lit_jax.train.sharding import detect_launcher

    assert detect_launcher(env) == want
