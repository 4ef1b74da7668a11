"""Mechanical mapping of PyTorch ``state_dict`` entries onto Flax variable trees.

Our Flax modules are named after the original's modules, so a key maps to a Flax path by rule:

* dotted segments become path entries, a numeric segment joins the one before it with ``_``
  (``block1.0.mlp.fc1.weight`` -> ``block1_0/mlp/fc1/weight``, ``layers.2.blocks.3`` -> ``layers_2/blocks_3``);
* the last segment names the variable: ``weight`` -> ``kernel`` for convs (OIHW -> HWIO) and linears
  ((out, in) -> (in, out)), ``scale`` for norms (1-D); ``bias`` stays; BatchNorm ``running_mean`` /
  ``running_var`` go to the ``batch_stats`` collection as ``mean`` / ``var``; ``num_batches_tracked`` has no
  counterpart (PyTorch-only bookkeeping) and is reported as ignored; any other name (``pos_embed1``,
  ``relative_position_bias_table``) is a parameter of the same name and layout.

:func:`convert_state_dict` applies the rule to a whole checkpoint, checks every key and every shape against the
target tree, and reports -- it never drops a key silently.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

Path = tuple[str, ...]
# (collection, path) of one Flax variable, e.g. ("params", ("block1_0", "mlp", "fc1", "kernel")).
VarKey = tuple[str, Path]


class ConversionError(ValueError):
    """A checkpoint that does not fit the model; the message lists every offending key."""


@dataclasses.dataclass
class ConversionReport:
    """What happened to every key, for logs and for tests."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> why
    ignored_buffers: list[str] = dataclasses.field(default_factory=list)
    resized: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> "from -> to"
    initialised: list[str] = dataclasses.field(default_factory=list)  # Flax paths kept at their init value

    def summary(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)} keys not used by the model: " + ", ".join(
                f"{k} ({why})" for k, why in sorted(self.dropped.items())))
        if self.ignored_buffers:
            lines.append(f"  ignored {len(self.ignored_buffers)} PyTorch bookkeeping buffers (num_batches_tracked)")
        if self.resized:
            lines.append("  resized: " + ", ".join(f"{k} {v}" for k, v in sorted(self.resized.items())))
        if self.initialised:
            lines.append("  not in the checkpoint, kept at initialisation: " + ", ".join(sorted(self.initialised)))
        return "\n".join(lines)


def torch_key_to_var(key: str, ndim: int) -> Optional[VarKey]:
    """Maps a torch key to ``(collection, path)``; None for ``num_batches_tracked`` (no Flax counterpart)."""
    segments: list[str] = []
    for seg in key.split("."):
        if seg.isdigit() and segments:
            segments[-1] = f"{segments[-1]}_{seg}"
        else:
            segments.append(seg)
    *module, leaf = segments
    if leaf == "num_batches_tracked":
        return None
    if leaf == "running_mean":
        return "batch_stats", tuple(module) + ("mean",)
    if leaf == "running_var":
        return "batch_stats", tuple(module) + ("var",)
    if leaf == "weight":
        return "params", tuple(module) + (("kernel",) if ndim >= 2 else ("scale",))
    return "params", tuple(module) + (leaf,)


def torch_to_flax_layout(key: str, value: np.ndarray) -> np.ndarray:
    """Converts a weight's memory layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if key.endswith(".weight"):
        if value.ndim == 4:
            return np.ascontiguousarray(np.transpose(value, (2, 3, 1, 0)))
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
    return value


def flatten_variables(tree: Mapping[str, Any]) -> dict[VarKey, Any]:
    """``{'params': {...}, 'batch_stats': {...}}`` -> ``{(collection, path): leaf}``."""
    flat: dict[VarKey, Any] = {}

    def walk(collection: str, prefix: Path, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(collection, prefix + (str(k),), v)
        else:
            flat[(collection, prefix)] = node

    for collection, sub in tree.items():
        walk(collection, (), sub)
    return flat


def unflatten_variables(flat: Mapping[VarKey, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_variables` (plain nested dicts)."""
    tree: dict[str, Any] = {}
    for (collection, path), leaf in flat.items():
        node = tree.setdefault(collection, {})
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf
    return tree


def format_var(var: VarKey) -> str:
    collection, path = var
    return f"{collection}/{'/'.join(path)}"


# A rule that rewrites a source array whose shape differs from the target's (e.g. resizing a bias table);
# returns the new array, or None when it does not apply.
Resizer = Callable[[str, np.ndarray, tuple[int, ...]], Optional[np.ndarray]]


def _initial_value(var: VarKey, leaf: Any) -> np.ndarray:
    if isinstance(leaf, np.ndarray) or type(leaf).__name__ in ("ArrayImpl", "Array"):
        return np.asarray(leaf)
    fill = np.ones if var[1][-1] in ("scale", "var") else np.zeros
    return fill(tuple(leaf.shape), dtype=np.float32)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    source: str,
    drop: Mapping[str, str] = (),
    allow_missing: Mapping[str, str] = (),
    resize: Optional[Resizer] = None,
    rename: Optional[Callable[[str], str]] = None,
) -> tuple[dict[str, Any], ConversionReport]:
    """Converts a PyTorch state_dict to a Flax variable tree shaped like ``target``.

    Args:
      state_dict: ``{torch key: array}`` (already unwrapped from ``model``/``state_dict``).
      target: the model's variables (arrays or ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``).
        For a variable the checkpoint may legitimately lack, a leaf with a value is used as is; a shape-only
        leaf starts as PyTorch's default (ones for norm scales and running variances, zeros otherwise).
      source: a name for messages (the file path).
      drop: ``{regex: reason}``; keys that fully match are reported as dropped (classifier-only keys).
      allow_missing: ``{regex over 'collection/path': reason}``; target variables that may be absent from
        the checkpoint and keep their value from ``target``.
      resize: called when a shape differs; may return a resized array.
      rename: maps a source key to the key used for the rule (e.g. stripping a ``backbone.`` prefix).
    Returns:
      ``(variables, report)``; variables as nested dicts of float32/int numpy arrays.
    Raises:
      ConversionError listing every unexpected key, every missing variable and every shape mismatch.
    """
    drop_rules = [(re.compile(p), why) for p, why in dict(drop).items()]
    missing_rules = [(re.compile(p), why) for p, why in dict(allow_missing).items()]
    report = ConversionReport(source=source)
    flat_target = flatten_variables(target)
    out: dict[VarKey, Any] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []

    for key in state_dict:
        value = np.asarray(state_dict[key])
        rule_key = rename(key) if rename else key
        why = next((w for p, w in drop_rules if p.fullmatch(rule_key)), None)
        if why is not None:
            report.dropped[key] = why
            continue
        var = torch_key_to_var(rule_key, value.ndim)
        if var is None:
            report.ignored_buffers.append(key)
            continue
        if var not in flat_target:
            unexpected.append(f"{key} {tuple(value.shape)} (would be {format_var(var)})")
            continue
        want = tuple(flat_target[var].shape)
        array = torch_to_flax_layout(rule_key, value)
        if tuple(array.shape) != want and resize is not None:
            resized = resize(rule_key, array, want)
            if resized is not None:
                report.resized[key] = f"{tuple(array.shape)} -> {want}"
                array = resized
        if tuple(array.shape) != want:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} -> {tuple(array.shape)}, model expects {want}")
            continue
        dtype = np.float32 if np.issubdtype(array.dtype, np.floating) else array.dtype
        out[var] = np.asarray(array, dtype=dtype)
        report.loaded.append(key)

    missing = []
    for var, leaf in flat_target.items():
        if var in out:
            continue
        name = format_var(var)
        if any(p.fullmatch(name) for p, _ in missing_rules):
            out[var] = _initial_value(var, leaf)
            report.initialised.append(name)
        else:
            missing.append(f"{name} {tuple(leaf.shape)}")

    problems = []
    if missing:
        problems.append(f"{len(missing)} model variable(s) missing from the checkpoint:\n    " + "\n    ".join(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s):\n    " + "\n    ".join(unexpected))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):\n    " + "\n    ".join(mismatched))
    if problems:
        raise ConversionError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
    return unflatten_variables(out), report
