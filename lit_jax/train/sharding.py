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


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes.

    Detected from the environment: SLURM (``SLURM_NTASKS`` > 1), or an explicit coordinator
    (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``). On CPU the collectives
    need gloo, which is selected first. Single-process runs skip this.
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not (explicit or slurm):
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


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
