"""Fixtures of the data tests: one small synthetic COCO-format dataset and its tfds build per session."""
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

NUM_TRAIN, NUM_VAL = 12, 5


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from lit_jax.data.synthetic import make_synthetic_coco
    out = str(tmp_path_factory.mktemp("synthetic_coco"))
    make_synthetic_coco(out, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0)
    return out


@pytest.fixture(scope="session")
def built(synth_dir, tmp_path_factory):
    """(data_dir, name) of the synthetic dataset built through the tfds builder (with masks)."""
    from lit_jax.data import coco_builder
    logging.getLogger("absl").setLevel(logging.WARNING)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    coco_builder.build(synth_dir, data_dir, "synth")
    return data_dir, "synth"
