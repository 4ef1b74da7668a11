"""Starting a training run from a whole detector (``model.load_from``), as mmdetection's ``load_from``.

Every variable whose path and shape match is taken from the source; when ``model.num_classes`` differs from the
source's, the detector's class-dependent layers (``detector.class_layers``) keep their fresh initialisation.
Anything else that differs is an error listing the variables.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from lit_jax.convert.mapping import flatten_variables, format_var, unflatten_variables

log = logging.getLogger(__name__)


class LoadFromError(ValueError):
    """``model.load_from`` weights that do not fit the configured detector (the message lists the variables)."""


def read_source(path: str, detector, model_section: dict):
    """The source detector's variables (``lit_jax.inference.weights.Weights``), read without checking them
    against ``detector`` (their class count may differ). A ``.pth`` is converted for a detector like the
    configured one with the checkpoint's own class count."""
    from lit_jax.inference.weights import Weights, read_converted, read_training_checkpoint

    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.load_from={path!r} does not exist (a released .pth, a convert_weights.py "
                                "folder, a training workdir or a checkpoint step folder)")
    if os.path.isfile(path):
        from lit_jax.convert.mmdet import convert_detector
        from lit_jax.convert.torch_reader import extract_state_dict, read_pth
        from lit_jax.models.registry import build_detector

        raw = read_pth(path, allow_unknown_as_placeholder=True)
        state_dict = extract_state_dict(raw, path)
        try:
            num_classes = detector.num_classes_in_state_dict(state_dict)
        except KeyError as err:
            raise LoadFromError(f"model.load_from={path}: no {err} key; is it a {type(detector).__name__} "
                                "checkpoint?") from None
        source = build_detector(dict(model_section, num_classes=num_classes))
        variables, _ = convert_detector(state_dict, source, source=path)
        meta = raw.get("meta", {}) if isinstance(raw, dict) else {}
        names = meta.get("CLASSES") if isinstance(meta, dict) else None
        return Weights(variables, [str(n) for n in names] if names else None, None, path)
    if os.path.isdir(os.path.join(path, "variables")):
        return read_converted(path)
    return read_training_checkpoint(path)


def merge_for_finetuning(fresh: dict, source: dict, class_layers, source_name: str) -> tuple[dict, dict]:
    """``fresh`` variables (``{'params', 'batch_stats'}``, the detector's initialisation) with every matching
    variable replaced by ``source``'s. Returns ``(variables, report)``; ``report`` has ``loaded`` (count) and
    ``reinitialised`` (the class layers kept fresh). Raises LoadFromError listing any other difference."""
    flat_fresh = flatten_variables(fresh)
    flat_src = flatten_variables(source)
    class_prefixes = tuple(f"params/{p}/" for p in class_layers)

    def is_class_layer(key) -> bool:
        return (format_var(key) + "/").startswith(class_prefixes)

    out, reinit, problems, loaded = {}, set(), [], 0
    for key, init in flat_fresh.items():
        have = flat_src.get(key)
        if have is not None and tuple(np.shape(have)) == tuple(np.shape(init)):
            out[key] = np.asarray(have, dtype=np.asarray(init).dtype)
            loaded += 1
        elif have is not None and is_class_layer(key):
            out[key] = init
            reinit.add("/".join(key[1][:-1]))
        elif have is None:
            problems.append(f"missing {format_var(key)}")
        else:
            problems.append(f"{format_var(key)}: source {tuple(np.shape(have))} vs model {tuple(np.shape(init))}")
    problems += [f"unexpected {format_var(k)}" for k in sorted(flat_src.keys() - flat_fresh.keys())]
    if problems:
        raise LoadFromError(f"model.load_from={source_name} does not fit the configured detector (only the "
                            f"class layers {list(class_layers)} may differ): " + "; ".join(sorted(problems)))
    return unflatten_variables(out), {"loaded": loaded, "reinitialised": sorted(reinit)}


def load_from(path: str, detector, model_section: dict, fresh: dict) -> tuple[dict, Any]:
    """The starting variables of a fine-tuning run (see the module docstring) and the source's Weights."""
    source = read_source(path, detector, model_section)
    variables, report = merge_for_finetuning(fresh, source.variables, detector.class_layers, source.source)
    if report["reinitialised"]:
        log.info("load_from %s: %d tensors loaded; re-initialised for %d classes: %s", source.source,
                 report["loaded"], detector.cfg.num_classes, ", ".join(report["reinitialised"]))
    else:
        log.info("load_from %s: all %d tensors loaded", source.source, report["loaded"])
    return variables, source
