"""Training checkpoints: a thin, safety-minded layer over ``orbax.checkpoint.CheckpointManager``.

What is stored where
--------------------
A :class:`CheckpointStore` owns one directory. Every saved step is a sub-folder named by the bare step
number (no prefix, no zero padding) holding two orbax *items*::

    <directory>/
      <step>/                       e.g. ``1200/``
        _CHECKPOINT_METADATA        orbax step metadata (item handler names, init/commit timestamps)
        commit_success.txt          orbax's commit marker (also written on local disks, see below)
        state/                      the array pytree -- StandardSave / StandardRestore
          _METADATA                 tree structure + per-leaf type/shape/dtype (JSON)
          _sharding                 shardings the arrays had when saved (JSON)
          manifest.ocdbt, d/        OCDBT key-value store (TensorStore) holding the array chunks
          ocdbt.process_<i>/        per-process OCDBT sub-databases (one per jax process that wrote)
          array_metadatas/          per-process array metadata
        extra/
          metadata                  the ``extra`` dict as JSON -- JsonSave / JsonRestore
      <step>.orbax-checkpoint-tmp/  only while a save of <step> is in flight (or after a crash, see below)

``state`` is any pytree of ``jax.Array`` / ``numpy`` arrays: params, optimizer state (optax NamedTuples
are fine; empty nodes such as ``optax.EmptyState()``, ``None`` or ``{}`` are kept by the structure of the
restore target), batch statistics, the step counter, PRNG keys (``jax.random.key_data(key)`` -- raw
``uint32`` -- or typed key arrays directly, which orbax 0.12.8 stores as their key data). ``extra`` is a JSON-serialisable dict
(data iterator position, config, metrics); note that JSON turns tuples into lists and non-string dict keys
into strings.

Crash safety (how orbax makes a save atomic)
--------------------------------------------
On a local / POSIX file system orbax (``AtomicRenameTemporaryPath``) writes step ``N`` into
``<directory>/N.orbax-checkpoint-tmp/`` (its items into ``state.orbax-checkpoint-tmp/`` and
``extra.orbax-checkpoint-tmp/`` inside it), renames the items when they are complete, writes
``commit_success.txt`` and as the very last operation renames the step folder to ``<directory>/N``. A
process killed at any point before that rename leaves only the ``*.orbax-checkpoint-tmp`` folder; when orbax
lists steps it accepts only folders whose name is a bare integer (the ``.orbax-checkpoint-tmp`` suffix never
matches), so the half-written step is invisible and every earlier step is untouched (a save never writes into
an existing step folder). The stale temporary folder stays on disk until the same step is saved again (orbax
deletes it before writing) -- we deliberately do not turn on orbax's ``cleanup_tmp_directories``, because that
deletes *every* temporary folder when a manager is created, including one another job is writing right now.
On GCS orbax uses ``commit_success.txt`` instead of a rename to mark completion; the same listing rule applies.

Corruption handling
-------------------
Atomic saves do not protect against later damage (a truncated copy, a deleted file, a garbled JSON file).
:meth:`CheckpointStore.restore` without an explicit step tries the newest step first; when reading it raises,
it logs a ``WARNING`` naming the step and the error and tries the next older step, and so on. If no step can be
read it raises :class:`CheckpointRestoreError` listing every step with its error. With
``set_aside_unreadable=True`` (training resumes) the newer unreadable steps are then renamed to
``<step>.corrupt-<YYYYmmdd-HHMMSS>`` (one WARNING each, nothing deleted): orbax no longer lists them, so the
run can save those step numbers again. Before orbax reads a step, the OCDBT manifest, b-tree and per-array
``.zarray`` metadata are read synchronously (:meth:`CheckpointStore._preflight`), and after a failed read the
reads orbax abandoned are finalised at once (:func:`_collect_abandoned_reads`): both keep a fallback to one
warning instead of hundreds of "Event loop is closed" / "Exception ignored" tracebacks.

Saving (errors and logging)
---------------------------
A save that fails -- at once or in orbax's background thread (disk full, no permission) -- raises
:class:`CheckpointSaveError` ``could not save checkpoint step N to DIR: <reason>`` from the next :meth:`poll`
(non-blocking, once per training step), :meth:`wait`, :meth:`save`, :meth:`restore` or :meth:`close`. A committed
save logs ``checkpoint saved: step N -> DIR/N`` (INFO) when it is noticed there. How damage shows up (orbax
0.12.8): truncated/deleted array chunk files or a truncated ``manifest.ocdbt`` raise ``ValueError``
(``DATA_LOSS`` / ``OUT_OF_RANGE`` / ``NOT_FOUND`` from TensorStore) or a bare ``Exception("Encountered error
while reading array index ...")`` chained to the TensorStore error; a garbled ``state/_METADATA`` or
``extra/metadata`` raises ``json.JSONDecodeError``; a deleted ``extra/metadata`` ``FileNotFoundError``; a
missing item folder ``KeyError``. Damage orbax does *not* notice (the data is intact, so this is fine): a
deleted or garbled ``<step>/_CHECKPOINT_METADATA``, ``state/_sharding``, ``state/array_metadatas`` or
``commit_success.txt`` on a local disk, and a deleted ``state/_METADATA`` when a restore target is given.
Silent bit flips inside uncompressed chunk bytes are not detected (there is no checksum).

A restore target whose *structure* differs from the checkpoint (missing or extra leaves, different shapes)
is a caller error, not corruption: it raises :class:`CheckpointStructureError` naming the differing paths and
does not fall back. Dtypes may differ -- orbax casts to the target dtype (e.g. float32 -> bfloat16).

Multi-process runs
------------------
Every process must call ``save``/``restore``/``wait``/``delete``/``close`` with the same arguments, as with
orbax itself. Saving goes through one ordinary ``CheckpointManager``: orbax makes the primary process
create/rename/delete folders and write ``extra``, and each process writes its own array shards. Restoring
goes through a short-lived read-only ``CheckpointManager`` restricted to the calling process
(``MultiprocessingOptions(primary_host=me, active_processes={me})``), which makes orbax skip the global
barrier it otherwise runs at the end of every restore: a chunk file that only one process reads can fail on
that process alone, and a process that raised before the barrier would leave the others' collectives
mismatched (observed with orbax 0.12.8 on two CPU processes: ``sync_global_devices name mismatch``). Instead,
after each attempted step all processes exchange one status code via
``jax.experimental.multihost_utils.process_allgather`` and accept the step only if every process read it, so
they never resume from different steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointStore", "CheckpointRestoreError", "CheckpointSaveError", "CheckpointStructureError"]

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
EXTRA_ITEM = "extra"

_MAX_REASON_CHARS = 400
_MAX_LISTED_PATHS = 20


class CheckpointRestoreError(RuntimeError):
    """No checkpoint could be restored; ``failures`` maps each tried step to its exception."""

    def __init__(self, message: str, failures: Mapping[int, BaseException]):
        super().__init__(message)
        self.failures = dict(failures)


class CheckpointSaveError(RuntimeError):
    """A save failed (at once or in the background); the message names the step, the directory and the reason."""

    def __init__(self, step: int, directory: str, cause: BaseException):
        super().__init__(f"could not save checkpoint step {step} to {directory}: {_describe(cause)}")
        self.step = step


class _OrbaxLogNoise(logging.Filter):
    """Quiets two kinds of orbax log records (orbax logs through absl's ``absl`` Python logger):

    * ``Given directory is read only=...`` (WARNING), logged whenever a manager is opened with ``read_only=True``:
      our restore reader is read-only on purpose, so on every resume the notice only misled users. Dropped.
    * the ERROR records of a failed background save (``Failed to run ... Commit operations``, ``Save Finalize
      thread ... failed``) carry the full traceback through orbax's threads; the store reports the same error
      as one :class:`CheckpointSaveError` (chained to the original exception). The line is kept, the
      traceback dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Given directory is read only"):
            return False
        if record.levelno >= logging.ERROR and record.exc_info and (
                "Commit operations" in msg or "Save Finalize thread" in msg):
            record.exc_info, record.exc_text = None, None
        return True


_ORBAX_LOG_FILTER = _OrbaxLogNoise()


class CheckpointStructureError(ValueError):
    """The restore target's tree structure or shapes differ from those stored in the checkpoint."""


def _describe(exc: BaseException) -> str:
    """One-line ``Type: message`` of ``exc`` and of its innermost cause (orbax wraps TensorStore errors)."""

    def one(e: BaseException) -> str:
        text = " ".join(str(e).split())
        text = text.split(" See full TensorStore details")[0]  # drop orbax's multi-KB TensorStore spec dump
        if len(text) > _MAX_REASON_CHARS:
            text = text[:_MAX_REASON_CHARS] + "..."
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    root = exc
    seen = {id(exc)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    return one(exc) if root is exc else f"{one(exc)} (caused by {one(root)})"


def _path_str(key: tuple) -> str:
    return "/".join(str(k) for k in key)


_OK, _UNREADABLE, _STRUCTURE_ERROR = 0, 1, 2


def _worst_over_processes(code: int) -> int:
    """Max of ``code`` over all jax processes (a collective: every process must call it, in the same order)."""
    if jax.process_count() == 1:
        return code
    from jax.experimental import multihost_utils

    codes = multihost_utils.process_allgather(np.asarray(code, np.int32))
    return int(np.max(np.asarray(codes)))


def _abstract_leaf(x: Any) -> Any:
    """Target leaf -> what orbax needs: shape, dtype and (for jax arrays) sharding; data is dropped."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x  # jax.ShapeDtypeStruct (kept with its sharding) or a python scalar


def _stored_shape(leaf: Any) -> Optional[tuple]:
    """Shape the target leaf has on disk (typed PRNG keys are stored as their ``key_data``)."""
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None:
        return None
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype)).shape)
    return tuple(shape)


def _collect_abandoned_reads() -> None:
    """Finalises, now and quietly, the read coroutines orbax abandoned when a restore failed.

    orbax reads all arrays concurrently on a private event loop; when one read fails it closes the loop with the
    other reads still pending. Whenever the garbage collector later finalises those coroutines, each raises
    from its ``await`` (``Exception: Encountered error while reading array index`` chained to
    ``GeneratorExit``) and Python prints it as an "Exception ignored" traceback -- hundreds, at a random later
    moment of training. Their step already failed and is reported once by :meth:`CheckpointStore.restore`, so
    here they are collected right away with only *their* reports (coroutines defined in orbax) dropped;
    everything else still reaches the previous ``sys.unraisablehook``.
    """
    import gc
    import sys
    import types

    previous = sys.unraisablehook

    def hook(unraisable):
        obj = unraisable.object
        if isinstance(obj, types.CoroutineType) and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


class CheckpointStore:
    """Keeps the last ``keep`` training checkpoints of ``(state, extra)`` under ``directory``.

    Args:
      directory: folder of the store (created if missing); a local path or any path orbax/etils accepts
        (e.g. ``gs://...``).
      keep: how many of the newest steps to keep; older ones are deleted by orbax after each save.
      async_save: if True ``save`` returns once the arrays are copied to host memory and writes them in a
        background thread; :meth:`wait` (or the next ``save``/``restore``/``close``) blocks until durable.

    See the module docstring for the on-disk layout, crash safety and corruption handling.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self.keep = keep
        self.async_save = async_save
        self._pending: Optional[int] = None  # step of a save not yet reported as committed (see wait/poll)
        self._is_primary = jax.process_index() == 0
        logging.getLogger("absl").addFilter(_ORBAX_LOG_FILTER)  # idempotent: one filter object, added once
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
        # Handlers registered up front (rather than inferred by orbax from the first save's args), so that a
        # freshly opened store can interpret existing steps' items before it has saved anything.
        self._manager = ocp.CheckpointManager(
            directory,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                EXTRA_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: Any, extra: Mapping[str, Any]) -> None:
        """Saves ``state`` (array pytree) under ``<dir>/<step>/state`` and ``extra`` (JSON) under ``.../extra``.

        With ``async_save`` this returns once device arrays are copied to host memory, so the caller may
        donate/overwrite them right away; the write finishes in the background. A save started while an
        earlier one is still being written first waits for it (orbax does this).

        Raises:
          ValueError: ``step`` is not newer than the latest stored step (orbax would silently skip it; after a
            fallback restore, restore with ``set_aside_unreadable=True`` or :meth:`delete` the newer steps).
          CheckpointSaveError: this save, or the previous asynchronous one, could not be written.
          TypeError: ``extra`` is not a JSON-serialisable mapping.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra must be a mapping, got {type(extra).__name__}")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"extra must be JSON-serialisable: {e}") from e
        self.wait()  # a failed earlier save is reported here, under its own step, before anything else
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"cannot save step {step} in {self.directory}: it is not newer than the latest stored step "
                f"{latest} (stored steps: {self.all_steps()}); delete the newer steps first if resuming "
                "from an older checkpoint"
            )
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.StandardSave(state), EXTRA_ITEM: ocp.args.JsonSave(dict(extra))}
                ),
            )
        except OSError as e:  # e.g. no space left / not writable while writing the blocking part
            raise CheckpointSaveError(step, self.directory, e) from e
        if not saved:  # should_save() said no; with our options this should not happen.
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")
        self._pending = step
        if not self.async_save:
            self.wait()

    def poll(self) -> None:
        """Non-blocking: if the pending background save has ended, reports it (log line or CheckpointSaveError).

        Call it once per training step so a failed save stops training at once rather than a save later.
        """
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the pending (async) save is written and committed, then logs
        ``checkpoint saved: step N -> DIR``.

        Raises:
          CheckpointSaveError: the save failed (naming its step, this directory and orbax's reason).
        """
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- any failure of the background write is a failed save
            if step is None:
                raise
            raise CheckpointSaveError(step, self.directory, e) from e
        if step is not None and self._is_primary:
            logger.info("checkpoint saved: step %d -> %s", step, os.path.join(self.directory, str(step)))

    # ------------------------------------------------------------------ listing

    def all_steps(self) -> list[int]:
        """Committed steps, ascending, plus any step this store is still writing asynchronously."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest step (see :meth:`all_steps`), or None for an empty store."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def delete(self, step: int) -> None:
        """Deletes one stored step (e.g. corrupt steps newer than the one a fallback restore used)."""
        self.wait()
        self._manager.delete(int(step))

    # ------------------------------------------------------------------ restore

    def restore(self, target: Any, step: Optional[int] = None, *, set_aside_unreadable: bool = False
                ) -> tuple[int, Any, dict]:
        """Restores ``(step, state, extra)``.

        Args:
          target: pytree with the structure of the saved ``state``; its leaves (arrays or
            ``jax.ShapeDtypeStruct``) give each array's shape, dtype and sharding, and the restored arrays get
            exactly those shardings (a ``ShapeDtypeStruct`` without sharding gets the sharding recorded at save
            time in ``state/_sharding``, which only works on the same device topology). ``None`` restores as
            saved, for inspection.
          step: a step to restore; that step or an error, no fallback. ``None``: the newest step that can be
            read, falling back to older ones (with a WARNING each) when newer ones are unreadable.
          set_aside_unreadable: after a fallback, rename the newer unreadable steps to
            ``<step>.corrupt-<YYYYmmdd-HHMMSS>`` (one WARNING each; nothing is deleted) so that training can save
            those step numbers again. Off for read-only uses (evaluation).

        Raises:
          FileNotFoundError: the store holds no steps, or not the requested one.
          CheckpointStructureError: ``target`` does not match the stored tree structure / shapes.
          CheckpointRestoreError: no candidate step could be read; lists each step and its error.
        """
        # Make our own pending saves durable, then pick up steps other jobs may have written meanwhile.
        self.wait()
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        if step is not None:
            step = int(step)
            if step not in steps:
                raise FileNotFoundError(f"step {step} not found in {self.directory}; stored steps: {steps}")
            candidates = [step]
        else:
            candidates = steps[::-1]

        abstract = None if target is None else jax.tree.map(_abstract_leaf, target)
        failures: dict[int, BaseException] = {}
        found = None
        reader = self._process_local_reader()
        try:
            for i, s in enumerate(candidates):
                result, error = None, None
                try:
                    self._preflight(s)
                    self._check_structure(reader, s, abstract)
                    result = self._restore_step(reader, s, abstract)
                except Exception as e:  # noqa: BLE001 -- any read error means "this step is unusable"
                    error = e
                    _collect_abandoned_reads()
                if isinstance(error, CheckpointStructureError):
                    code = _STRUCTURE_ERROR
                else:
                    code = _OK if error is None else _UNREADABLE
                code = _worst_over_processes(code)
                if code == _OK:
                    found = (s, result[0], result[1])
                    break
                if code == _STRUCTURE_ERROR:
                    if isinstance(error, CheckpointStructureError):
                        raise error
                    raise CheckpointStructureError(
                        f"checkpoint step {s} in {self.directory} does not match the restore target's structure "
                        "(reported by another jax process)"
                    )
                if error is None:
                    error = RuntimeError("read on this process but failed on another jax process")
                failures[s] = error
                if i + 1 < len(candidates):
                    logger.warning(
                        "Checkpoint step %d in %s could not be restored (%s); falling back to step %d.",
                        s, self.directory, _describe(error), candidates[i + 1],
                    )
        finally:
            reader.close()
        if found is not None:
            if failures and set_aside_unreadable:
                self._set_aside(sorted(failures), found[0])
            return found
        lines = "\n".join(f"  step {s}: {_describe(e)}" for s, e in failures.items())
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} could be restored; tried:\n{lines}", failures
        ) from failures[candidates[-1]]

    def _set_aside(self, steps: list[int], restored: int) -> None:
        """Renames unreadable ``steps`` to ``<step>.corrupt-<time>`` (not a bare integer, so orbax no longer lists
        them and the step numbers can be saved again); the primary process renames, the others wait for it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if self._is_primary:
            for s in steps:
                src = os.path.join(self.directory, str(s))
                dst = f"{src}.corrupt-{stamp}"
                n = 1
                while os.path.exists(dst):  # two fallbacks within one second: never overwrite what was set aside
                    n += 1
                    dst = f"{src}.corrupt-{stamp}-{n}"
                os.rename(src, dst)
                logger.warning("unreadable checkpoint step %d moved aside to %s (training continues from step %d)",
                               s, dst, restored)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lit_checkpoint_set_aside")
        self._manager.reload()

    def _process_local_reader(self) -> ocp.CheckpointManager:
        """A read-only manager over the same directory whose restores contain no cross-process barrier.

        orbax ends every restore with a global barrier. In a multi-process run where only some processes
        fail to read a step (each reads its own shards, so chunk damage is often seen by one process only),
        the failing processes would skip that barrier and the processes' collectives would no longer pair up
        (a hang or a ``sync_global_devices name mismatch``). Restricting the reader to this process makes the
        restore barrier-free; :func:`_worst_over_processes` is then the single, symmetric collective per step.
        """
        me = jax.process_index()
        return ocp.CheckpointManager(
            self.directory,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                EXTRA_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                read_only=True,
                create=False,
                max_to_keep=None,
                save_interval_steps=0,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"lit_reader_{me}"
                ),
            ),
        )

    def _preflight(self, step: int) -> None:
        """Reads the step's OCDBT manifest, b-tree and every array's ``.zarray`` metadata synchronously.

        Damage there (e.g. a truncated ``manifest.ocdbt``) would otherwise make all of orbax's concurrent array
        opens fail at once; orbax then closes its asyncio loop while TensorStore still completes the other
        opens, and each of those prints a ``RuntimeError: Event loop is closed`` traceback (hundreds per
        restore, burying the fallback warning). Found here, the step fails with one clean error and orbax is
        never asked. Cheap: a few small reads; array chunks are not read. Local directories only.
        """
        path = os.path.join(self.directory, str(step), STATE_ITEM)
        if "://" in self.directory or not os.path.isfile(os.path.join(path, "manifest.ocdbt")):
            return
        import tensorstore as ts

        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/"}).result()
        reads = [(k, kv.read(k)) for k in kv.list().result() if k.endswith(b"/.zarray")]
        for key, read in reads:
            try:
                json.loads(read.result().value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: array metadata {key.decode()} is not valid JSON ({e})") from e

    @staticmethod
    def _restore_step(reader: ocp.CheckpointManager, step: int, abstract: Any) -> tuple[Any, dict]:
        restored = reader.restore(
            step,
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract), EXTRA_ITEM: ocp.args.JsonRestore()}
            ),
        )
        extra = restored[EXTRA_ITEM]
        if not isinstance(extra, dict):
            raise ValueError(f"'{EXTRA_ITEM}' item of step {step} is not a JSON object: {type(extra).__name__}")
        return restored[STATE_ITEM], extra

    def _check_structure(self, reader: ocp.CheckpointManager, step: int, abstract: Any) -> None:
        """Compares the target against the stored tree metadata; raises CheckpointStructureError on mismatch.

        An unreadable metadata file raises its own error (treated as corruption by the caller); missing
        metadata (orbax returns None) skips the check and leaves it to the restore itself.
        """
        if abstract is None:
            return
        meta = reader.item_metadata(step)[STATE_ITEM]
        if meta is None:
            return
        stored = ocp.tree.to_flat_dict(getattr(meta, "tree", meta))
        wanted = ocp.tree.to_flat_dict(abstract)
        missing = sorted(_path_str(k) for k in wanted.keys() - stored.keys())
        unexpected = sorted(_path_str(k) for k in stored.keys() - wanted.keys())
        shapes = []
        for key in sorted(wanted.keys() & stored.keys(), key=_path_str):
            want, have = _stored_shape(wanted[key]), getattr(stored[key], "shape", None)
            if want is not None and have is not None and tuple(have) != want:
                shapes.append(f"{_path_str(key)}: checkpoint {tuple(have)} vs target {tuple(wanted[key].shape)}")
        if not (missing or unexpected or shapes):
            return

        def listing(items: list[str]) -> str:
            more = f", ... ({len(items) - _MAX_LISTED_PATHS} more)" if len(items) > _MAX_LISTED_PATHS else ""
            return ", ".join(items[:_MAX_LISTED_PATHS]) + more

        parts = []
        if missing:
            parts.append(f"in target but not in checkpoint: {listing(missing)}")
        if unexpected:
            parts.append(f"in checkpoint but not in target: {listing(unexpected)}")
        if shapes:
            parts.append(f"shape differs: {listing(shapes)}")
        raise CheckpointStructureError(
            f"checkpoint step {step} in {self.directory} does not match the restore target's structure; "
            + "; ".join(parts)
        )

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Waits for pending saves (raising CheckpointSaveError if one failed), then releases orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.directory!r}, keep={self.keep}, async_save={self.async_save})"


def restore_subtrees(directory: str, keys: tuple[str, ...] = ("params", "batch_stats"), step: Optional[int] = None,
                     device: Optional[Any] = None) -> tuple[int, dict, dict]:
    """Restores only ``state[key]`` for ``keys`` (e.g. the model variables, no optimizer state) of a stored step,
    as the arrays were saved, onto one ``device`` (default: the first local one), whatever the topology the
    run was saved on. Returns ``(step, {key: subtree}, extra)``.

    ``step`` None: the newest readable step, falling back to older ones with a WARNING each (as
    :meth:`CheckpointStore.restore`). Raises FileNotFoundError (no steps, or not ``step``) and
    CheckpointRestoreError (no candidate could be read).
    """
    directory = os.path.abspath(os.fspath(directory))
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    if step is not None and int(step) not in steps:
        raise FileNotFoundError(f"step {step} not found in {directory}; stored steps: {steps}")
    candidates = [int(step)] if step is not None else steps[::-1]
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    failures: dict[int, BaseException] = {}
    checkpointer = ocp.PyTreeCheckpointer()
    for i, s in enumerate(candidates):
        state_dir = os.path.join(directory, str(s), STATE_ITEM)
        try:
            tree = checkpointer.metadata(state_dir).item_metadata
            tree = getattr(tree, "tree", tree)
            if not isinstance(tree, Mapping) or "params" not in tree:
                raise CheckpointStructureError(f"checkpoint step {s} in {directory} is not a training state "
                                               "(no 'params')")
            # An empty subtree (no BatchNorm) is not stored: it comes back as {}.
            abstract = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree[k])
                        for k in keys if k in tree}
            restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), abstract),
                partial_restore=True))
            with open(os.path.join(directory, str(s), EXTRA_ITEM, "metadata")) as f:
                extra = json.load(f)
            return s, {k: restored.get(k, {}) for k in keys}, extra
        except CheckpointStructureError:
            raise
        except Exception as e:  # noqa: BLE001 -- any read error means "this step is unusable"; all are reported
            failures[s] = e
            if i + 1 < len(candidates):
                logger.warning("Checkpoint step %d in %s could not be read (%s); trying step %d.", s, directory,
                               _describe(e), candidates[i + 1])
    lines = "\n".join(f"  step {s}: {_describe(e)}" for s, e in failures.items())
    raise CheckpointRestoreError(f"no checkpoint in {directory} could be restored; tried:\n{lines}", failures
                                 ) from failures[candidates[-1]]
