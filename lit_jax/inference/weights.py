"""Detector weights from any place a user has them, with the class names that travel with them.

Accepted: a released mmdet ``.pth`` (converted on the fly, read without torch, nothing executed), a
``convert_weights.py`` output folder (``variables/`` + ``conversion.json``), a training workdir (its latest
readable step), its ``checkpoints/`` folder, or one step folder (``.../checkpoints/1200``). Only the model
variables are read: no optimizer state, so the training run's optimizer settings do not matter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np

from lit_jax.convert.mapping import flatten_variables, format_var

log = logging.getLogger(__name__)

CONVERSION_INFO = "conversion.json"


class WeightsError(ValueError):
    """Weights that cannot be used with the configured detector (the message names the file and the keys)."""


@dataclasses.dataclass
class Weights:
    """variables: ``{'params', 'batch_stats'}`` (numpy or jax arrays); class_names / category_ids: what the
    weights were trained on (None when the source does not say); source: the path read; step: the training
    step of a checkpoint (None otherwise)."""
    variables: dict
    class_names: Optional[list]
    category_ids: Optional[list]
    source: str
    step: Optional[int] = None


def load_weights(path: str, detector) -> Weights:
    """Reads detector variables from ``path`` (see the module docstring) and checks that they fit ``detector``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights {path} do not exist (give a .pth, a converted folder, a training "
                                "workdir or a checkpoint step folder)")
    if os.path.isfile(path):
        weights = _from_pth(path, detector)
    elif os.path.isdir(os.path.join(path, "variables")):
        weights = read_converted(path)
    else:
        weights = read_training_checkpoint(path)
    check_fits(weights.variables, detector, weights.source)
    return weights


def _from_pth(path: str, detector) -> Weights:
    from lit_jax.convert.mmdet import read_mmdet_checkpoint

    variables, meta, _ = read_mmdet_checkpoint(path, detector)
    names = meta.get("CLASSES")
    names = [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None
    return Weights(variables, names, None, path)


def read_converted(path: str) -> Weights:
    """A ``convert_weights.py`` folder's variables and the class names of its ``conversion.json`` (unchecked)."""
    from lit_jax.convert.store import load_variables

    info = {}
    info_path = os.path.join(path, CONVERSION_INFO)
    if os.path.isfile(info_path):
        try:
            with open(info_path) as f:
                info = json.load(f)
        except json.JSONDecodeError as err:
            raise WeightsError(f"{info_path} is not valid JSON: {err}") from None
    return Weights(load_variables(path), info.get("class_names"), info.get("category_ids"), path)


def read_training_checkpoint(path: str) -> Weights:
    """The model variables and class names of a training workdir, ``checkpoints/`` folder or step (unchecked)."""
    from lit_jax.train.checkpoint import restore_subtrees

    step = None
    if os.path.basename(path).isdigit():
        path, step = os.path.dirname(path), int(os.path.basename(path))
    elif os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    step, variables, extra = restore_subtrees(path, ("params", "batch_stats"), step=step)
    log.info("restored the variables of step %d from %s", step, path)
    return Weights(variables, extra.get("class_names"), extra.get("category_ids"), path, step)


def check_fits(variables: dict, detector, source: str) -> None:
    """Raises WeightsError listing every missing, unexpected and mis-shaped variable of ``variables`` against
    the ``detector``'s own (no computation: shapes only)."""
    from lit_jax.convert.mmdet import detector_shapes

    want = {k: tuple(v.shape) for k, v in flatten_variables(dict(detector_shapes(detector))).items()}
    have = {k: tuple(np.shape(v)) for k, v in flatten_variables(dict(variables)).items()}
    missing = sorted(format_var(k) for k in want.keys() - have.keys())
    unexpected = sorted(format_var(k) for k in have.keys() - want.keys())
    shapes = sorted(f"{format_var(k)}: weights {have[k]} vs model {want[k]}"
                    for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or unexpected or shapes:
        parts = [f"{what} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
                 for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                 if items]
        raise WeightsError(f"{source} does not fit the configured detector; " + "; ".join(parts))


def resolve_class_names(weights: Weights, num_classes: int, override: Optional[Sequence[str]] = None
                        ) -> tuple[list, list]:
    """``(class_names, category_ids)`` for a detector of ``num_classes`` classes.

    ``override`` (the caller's names) wins over what the weights carry. A count that disagrees with
    ``num_classes`` is a WeightsError naming both numbers; weights that carry no names get ``'class_<i>'`` (with a
    warning) and category ids ``1..num_classes``."""
    names = list(override) if override is not None else weights.class_names
    ids = weights.category_ids if override is None else None
    if names is None:
        log.warning("%s carries no class names; using 'class_<i>' (pass class_names= to name them)", weights.source)
        names = [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        where = "class_names given" if override is not None else f"{weights.source} is trained on"
        raise WeightsError(f"{where} {len(names)} classes but model.num_classes is {num_classes}")
    if ids is None or len(ids) != num_classes:
        from lit_jax.evaluation.coco_classes import category_ids_for

        ids = category_ids_for(names)
    return [str(n) for n in names], [int(i) for i in ids]
