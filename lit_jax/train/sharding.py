"""Devices, hosts and shardings, stated once.

One ``Mesh`` over every device of every process with the single axis ``data``. Parameters, optimizer state
and BatchNorm statistics are replicated; batches are sharded on their leading axis. The train step is one
``jax.jit`` with explicit in/out shardings (the pjit style); there is no pmap path.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def detect_launcher(environ=None) -> str | None:
    """The multi-process launcher this process was started by, from its environment, or None (one process).

    ``'explicit'``: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES, JAX_PROCESS_ID); ``'slurm'``: srun with
    SLURM_NTASKS > 1; ``'openmpi'``: mpirun with OMPI_COMM_WORLD_SIZE > 1; ``'tpu_pod'``: a TPU slice of several
    hosts (TPU_WORKER_HOSTNAMES lists more than one); ``'kubernetes'``: an indexed Job or JobSet pod
    (JOB_COMPLETION_INDEX with KUBERNETES_SERVICE_HOST)."""
    env = os.environ if environ is None else environ

    def more_than_one(name: str) -> bool:
        try:
            return int(env.get(name, "1")) > 1
        except ValueError:
            return False

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if more_than_one("SLURM_NTASKS"):
        return "slurm"
    if more_than_one("OMPI_COMM_WORLD_SIZE"):
        return "openmpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu_pod"
    if env.get("JOB_COMPLETION_INDEX") is not None and env.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    return None


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes (:func:`detect_launcher`).

    With an explicit coordinator its address, process count and id are passed; for SLURM, Open MPI, TPU pods
    and Kubernetes, JAX's own cluster auto-detection fills them in. On CPU the collectives need gloo, which is
    selected first. Single-process runs skip this.
    """
    launcher = detect_launcher()
    if launcher is None:
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launcher == "explicit":
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", launcher,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices (all processes), axis ``data``."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def to_host(x) -> np.ndarray:
    """A (possibly multi-process, data-sharded) array as a full numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
    """A barrier across processes (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
