"""docs/custom_dataset.md, run as written: its config file and every command, in a fresh folder holding a 3-class
dataset of the user's own (made from the synthetic shapes) and a released-layout RetinaNet LIT-Ti checkpoint
(random weights saved by the PyTorch reference). CPU-sized overrides are appended to the commands that take a
config; nothing else is changed. Slow (a full-size detector is trained, evaluated and run): pytest -m slow."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.train.finetune_data import make_three_class_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_SIZED = ["--config.data.img_scale=(96, 64)", "--config.data.canvases=((96, 96),)", "--config.eval.mode=bucket",
             "--config.data.global_batch_size=2", "--config.data.eval_global_batch_size=2",
             "--config.data.shuffle_buffer=16", "--config.train.max_steps=2", "--config.train.checkpoint_every_steps=2",
             "--config.train.eval_every_epochs=0", "--config.train.log_every_steps=1",
             "--config.schedule.warmup_iters=0"]


def _blocks(text: str, lang: str) -> list:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_custom_dataset_doc_runs_as_written(tmp_path):
    from third_party.lit_torch.save_detector import save_random_detector

    doc = open(os.path.join(ROOT, "docs", "custom_dataset.md")).read()
    shutil.copytree(os.path.join(ROOT, "configs"), tmp_path / "configs")
    names = make_three_class_folder(str(tmp_path / "my_data"))
    save_random_detector("retinanet_lit_ti", str(tmp_path / "retinanet_lit_ti_1x.pth"), seed=2)
    (config_text,) = _blocks(doc, "python")
    (tmp_path / "configs" / "my_data.py").write_text(config_text)
    assert len([line for line in config_text.splitlines() if line.startswith("    ")]) == 5  # the five lines

    commands = [c for block in _blocks(doc, "bash") for c in block.strip().splitlines() if c.startswith("python")]
    assert len(commands) == 5
    env = dict(os.environ, PYTHONPATH=ROOT)
    for command in commands:
        argv = shlex.split(command)
        argv[0] = sys.executable
        if argv[1].startswith("scripts/"):
            argv[1] = os.path.join(ROOT, argv[1])
        if "--config" in argv:
            argv += CPU_SIZED
        run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
        assert run.returncode == 0, f"{command}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"

    assert len(os.listdir(tmp_path / "runs" / "my_data" / "browse")) == 4
    evals = [json.loads(x) for x in open(tmp_path / "runs" / "my_data" / "eval_results.jsonl")]
    assert "bbox_mAP" in evals[-1]
    assert len(os.listdir(tmp_path / "runs" / "my_data" / "predictions")) == 4
    drawn = os.listdir(tmp_path / "runs" / "my_data" / "drawn")
    assert len(drawn) == len(os.listdir(tmp_path / "my_data" / "images"))
    from lit_jax.inference import load_weights
    from lit_jax.models import build_detector

    weights = load_weights(str(tmp_path / "runs" / "my_data"),
                           build_detector({"type": "retinanet", "backbone": "lit_ti", "num_classes": 3}))
    assert weights.class_names == names
