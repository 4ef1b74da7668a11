"""Global batches on 8 virtual CPU devices (run in a subprocess: XLA_FLAGS must precede jax's import)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r"""
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, PartitionSpec
from lit_jax.data import pipeline as P

data_dir, name = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
cfg = P.DataConfig(data_dir=data_dir, dataset="coco_instances/" + name, img_scale=(384, 256),
                   global_batch_size=8, eval_global_batch_size=8, max_instances=8, with_masks=True,
                   mask_size=16)
out = {"train": [], "eval": []}
for kind, data in [("train", P.make_train_dataset(cfg, num_epochs=1)),
                   ("eval", P.make_eval_dataset(cfg))]:
    assert data.process_count == 1 and data.process_index == 0
    for step, batch in zip(range(2), data.global_batches(mesh)):
        rec = {"shapes": {k: list(v.shape) for k, v in batch.items()}, "devices": {}}
        for k, v in batch.items():
            assert isinstance(v, jax.Array) and v.sharding.spec == PartitionSpec("data"), k
            full = np.asarray(v)
            for sh in v.addressable_shards:
                assert sh.data.shape[0] == 1, (k, sh.data.shape)
                np.testing.assert_array_equal(np.asarray(sh.data), full[sh.index])
        for sh in batch["image_id"].addressable_shards:
            rec["devices"][str(sh.device)] = np.asarray(sh.data).tolist()
        out[kind].append(rec)
print("RESULT" + json.dumps(out))
"""


def test_data_eight_devices_get_disjoint_shards(built):
    data_dir, name = built
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", WORKER, data_dir, name], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    for kind in ("train", "eval"):
        assert len(out[kind]) >= 1
        for rec in out[kind]:
            assert all(s[0] == 8 for s in rec["shapes"].values())
            assert len(rec["devices"]) == 8
            assert all(len(v) == 1 for v in rec["devices"].values())  # one image per device
    # eval: every image on exactly one device (padding entries have id -1)
    ev = [i for rec in out["eval"] for v in rec["devices"].values() for i in v if i >= 0]
    assert len(ev) == len(set(ev)) > 0
