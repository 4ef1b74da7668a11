"""scripts/benchmark.py's synthetic inference and training and scripts/gpu_check.sh where tensorflow,
tensorflow_datasets and pycocotools cannot be imported (the GPU image; ml_collections travels there as a small
wheel): a sitecustomize blocks them in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCKER = '''import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(name + " is blocked for this test")
        return None
sys.meta_path.insert(0, _Block())
'''
ALL = ("tensorflow", "tensorflow_datasets", "pycocotools")
TINY = ["--size", "64x96", "--config.model.backbone_args.depths=(1, 1, 1, 1)"]


def _env(tmp_path, blocked):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCKER.format(blocked=tuple(blocked)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), ROOT]), JAX_PLATFORMS="cpu")
    return env


def test_blocker_works(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import tensorflow"], env=_env(tmp_path, ALL), capture_output=True,
                       text=True)
    assert r.returncode != 0 and "blocked for this test" in r.stderr


TRACE = """
import sys
sys.argv = ["benchmark.py"]
import importlib.util, jax, numpy as np
spec = importlib.util.spec_from_file_location("b", {script!r})
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
args, config = b.parse_args(["--config", {config!r}, "--mode", "infer", "--size", "64x96",
                             "--config.model.backbone_args.depths=(1, 1, 1, 1)"])
from lit_jax.benchmarking.setups import setup_infer
from lit_jax.models.registry import build_detector
det = build_detector(config.model)
variables = jax.eval_shape(lambda k: det.init(k, (64, 96)), jax.random.PRNGKey(0))
setup = setup_infer(config, np.zeros((1, 64, 96, 3), np.float32), variables)
out = jax.eval_shape(setup.build(config), *setup.args)
from lit_jax.train.trainer import Trainer  # train mode: the trainer and its DataConfig, without tensorflow
trainer = Trainer(config, "/nonexistent/workdir")
assert trainer.data_cfg.resolved_canvases()
assert not any(m.split(".")[0] in {blocked!r} for m in sys.modules)
print("traced", type(out).__name__)
"""


def test_infer_traces_without_tf_mlc_pycocotools(tmp_path):
    """Cheap (no XLA compilation): the harness, the config and the whole predict trace without the four."""
    code = TRACE.format(script=os.path.join(ROOT, "scripts", "benchmark.py"), blocked=ALL,
                        config=os.path.join(ROOT, "configs", "synthetic_mask_rcnn_lit_ti.py"))
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, ALL), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "traced" in r.stdout, r.stderr[-3000:]


def test_library_imports_without_torch_tf_pycocotools(tmp_path):
    """Every module of lit_jax.benchmarking imports with torch, the PyTorch reference and the three blocked; the
    torch comparison says where the reference lives instead of failing deep inside."""
    code = ("import pkgutil, importlib, lit_jax.benchmarking as b\n"
            "for m in pkgutil.iter_modules(b.__path__): importlib.import_module('lit_jax.benchmarking.' + m.name)\n"
            "from lit_jax.benchmarking.torch_reference import import_lit_torch\n"
            "import_lit_torch()\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, ALL + ("torch", "third_party")),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ImportError: the PyTorch reference" in r.stderr, r.stderr[-3000:]
    assert "PYTHONPATH=." in r.stderr and "scripts/setup_env.sh" in r.stderr


@pytest.mark.slow  # ~30-45 s: compiles predict
def test_infer_runs_without_tf_mlc_pycocotools(tmp_path):
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--config",
           os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py"), "--mode", "infer", "--steps", "1",
           "--warmup", "0", "--peak-flops", "1e12", "--out", str(out)] + TINY
    r = subprocess.run(cmd, env=_env(tmp_path, ALL), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["mode"] == "infer" and rec["images_per_s"] > 0 and rec["mfu"] > 0
    assert "MFU" in r.stdout


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path):
    """The device script end to end at a tiny size, one config (the train step compiles for minutes on CPU)."""
    env = dict(_env(tmp_path, ALL), PYTHON=sys.executable, GPU_CHECK_SIZE="64x96",
               GPU_CHECK_TINY="1", GPU_CHECK_BATCHES="4", GPU_CHECK_STEPS="1", GPU_CHECK_DTYPE="float32",
               GPU_CHECK_RUN_S="900", GPU_CHECK_BUDGET_S="3000", OUT=str(tmp_path / "out"),
               GPU_CHECK_CONFIGS="configs/synthetic_retinanet_lit_ti.py")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, capture_output=True,
                       text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "largest train batch that fits for synthetic_retinanet_lit_ti: 4" in r.stdout
    recs = [json.loads(line) for line in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    assert sorted((r["mode"], r["batch"]) for r in recs) == [("infer", 1), ("train", 2), ("train", 4)]
