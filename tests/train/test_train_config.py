"""Config files and --config overrides: every config loads and builds; bad keys and values are named."""

import glob
import os

import pytest

from lit_jax.config import ConfigError, load_config, split_overrides
from lit_jax.models import build_detector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not os.path.basename(p).startswith("base_"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_builds(path):
    config = load_config(path)
    det = build_detector(config)
    assert det.cfg.num_classes == config.model.num_classes
    from lit_jax.data.pipeline import DataConfig

    DataConfig.from_dict(config.data)


def test_overrides_are_typed_and_unknown_keys_named():
    path = os.path.join(ROOT, "configs", "retinanet_lit_s_fpn_1x_coco.py")
    rest, overrides = split_overrides(["--mode", "train", "--config.optimizer.lr=2e-4", "--config.schedule.milestones",
                                       "(7, 10)", "--config.model.backbone_args.use_checkpoint=False"])
    assert rest == ["--mode", "train"]
    config = load_config(path, overrides)
    assert config.optimizer.lr == 2e-4
    assert config.schedule.milestones == (7, 10)
    assert config.model.backbone_args.use_checkpoint is False
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr'.*known: \[.*'lr'"):
        load_config(path, [("optimizer.lrr", "1")])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lr'"):
        load_config(path, [("optim.lr", "1")])
    with pytest.raises(ConfigError, match="'train.seed' is int"):
        load_config(path, [("train.seed", "abc")])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(os.path.join(ROOT, "configs", "nope.py"))


def test_lit_s_config_has_the_original_settings():
    c = load_config(os.path.join(ROOT, "configs", "retinanet_lit_s_fpn_1x_coco.py"))
    assert c.optimizer.lr == 1e-4 and c.optimizer.weight_decay == 1e-4
    assert c.optimizer.no_decay_keywords == ("norm", "relative_position_bias_table")
    assert c.model.backbone_args.drop_path_rate == 0.2 and c.model.backbone_args.use_checkpoint
    assert c.schedule.milestones == (8, 11) and c.schedule.epochs == 12 and c.schedule.warmup_iters == 500
    assert c.data.global_batch_size == 16 and c.train.stats_group_size == 2
    t = load_config(os.path.join(ROOT, "configs", "retinanet_lit_ti_fpn_1x_coco.py"))
    assert t.optimizer.no_decay_keywords == () and t.model.backbone_args.drop_path_rate == 0.1
