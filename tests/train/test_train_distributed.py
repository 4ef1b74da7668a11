"""Data-parallel semantics: 8 devices, 2 processes and a by-hand per-GPU computation agree.

The original trains 8 GPUs x 2 images: each GPU normalises its loss and its BatchNorm statistics over its own 2
images, and DDP averages the gradients. ``sharded_step_worker.py by_hand`` does exactly that with a Python loop
over 2-image shards on one device; the jitted train step over a sharded global batch (8 virtual CPU devices;
or 2 processes on localhost with jax.distributed and gloo collectives) must give the same parameters.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_step_worker.py")


def _run(args, env_extra, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.Popen([sys.executable, WORKER] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=600):
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]


def _load(path):
    d = np.load(path)
    return {k: d[k] for k in d.files}


def _compare(a, b, atol):
    assert a.keys() == b.keys()
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a if k != "losses")
    assert worst <= atol, f"max |param diff| {worst}"


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hand") / "hand.npz")
    _wait([_run(["by_hand", out], {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})])
    return _load(out)


def test_eight_devices_equal_the_per_gpu_computation(by_hand, tmp_path):
    out = str(tmp_path / "dev8.npz")
    _wait([_run(["devices", out], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})])
    _compare(_load(out), by_hand, atol=1e-5)


@pytest.mark.slow  # ~2 minutes on 2 cores (two processes compile the step); run with -m slow
def test_two_processes_equal_one_process(by_hand, tmp_path):
    one = str(tmp_path / "one.npz")
    _wait([_run(["devices", one], {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    two = str(tmp_path / "two.npz")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    _wait([_run(["process", two, str(i), "2", port], env) for i in range(2)])
    _compare(_load(two), _load(one), atol=1e-5)
    _compare(_load(one), by_hand, atol=1e-5)
