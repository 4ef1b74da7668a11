"""Converted weights on disk: an orbax checkpoint of ``{'params', 'batch_stats'}`` plus a JSON report.

``scripts/convert_weights.py`` writes them; training configs point ``model.pretrained`` at the folder and
:func:`load_variables` reads them back.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np
import orbax.checkpoint as ocp

_TREE = "variables"
_INFO = "conversion.json"


def save_variables(dst: str, variables: Mapping[str, Any], info: Optional[Mapping[str, Any]] = None) -> str:
    """Writes ``variables`` under ``dst/variables`` (orbax) and ``info`` as ``dst/conversion.json``.

    ``dst`` must not already hold a converted checkpoint (orbax refuses to overwrite); returns ``dst``.
    """
    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    tree = {k: dict(v) for k, v in variables.items()}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(dst, _TREE), tree)
        ckpt.wait_until_finished()
    if info is not None:
        with open(os.path.join(dst, _INFO), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
    return dst


def held_entries(dst: str) -> list[str]:
    """The paths under ``dst`` that a previous :func:`save_variables` wrote (empty if none)."""
    return [os.path.join(dst, n) for n in (_TREE, _INFO) if os.path.lexists(os.path.join(dst, n))]


def check_destination(dst: str, overwrite: bool = False) -> None:
    """Raises ValueError naming ``dst`` when it cannot take a converted checkpoint: it is a file, or it holds one
    already and ``overwrite`` is False. Cheap: call it before a long conversion."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"--dst {dst} exists and is not a folder")
    held = held_entries(dst)
    if held and not overwrite:
        raise ValueError(f"--dst {dst} already holds a converted checkpoint ({', '.join(held)}); choose another "
                         "folder or pass --overwrite")


def remove_held(dst: str) -> None:
    """Deletes what a previous :func:`save_variables` wrote under ``dst`` (nothing else)."""
    import shutil

    for old in held_entries(dst):
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)


def load_variables(src: str) -> dict[str, Any]:
    """Reads what :func:`save_variables` wrote, as nested dicts of numpy arrays."""
    src = os.path.abspath(src)
    path = os.path.join(src, _TREE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{src} holds no converted checkpoint (expected the folder {path})")
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(path)
    return _to_numpy(tree)


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
