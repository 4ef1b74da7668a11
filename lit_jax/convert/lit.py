"""Import of the LIT backbone checkpoints (the released ImageNet ``lit_ti.pth`` / ``lit_s.pth``).

``load_pth(path, model)`` reads a ``.pth`` without torch and without executing code from it, maps every key
onto the Flax backbone and returns ``{'params': ..., 'batch_stats': ...}`` for ``model.apply``. What the
original's loaders do, and what we do (``shared/parity_spec.md`` §11-12):

* LIT-Ti: the classifier-only ``cls_token``, ``norm.*`` and ``head.*`` are dropped (reported). The original
  loads with mmcv's ``load_checkpoint``, which only unwraps ``state_dict``: a file nested under ``model`` loads
  nothing, silently. We unwrap ``model`` too and say so in the log.
* LIT-S: ``head.*``, ``norm.*`` (the classifier's final norm; it is *not* the detection ``norm3``) and the
  ``relative_position_index`` buffers are dropped; ``norm1-3`` are absent and start as (1, 0); the
  relative-position-bias tables (27x27 and 13x13 per head) are resized to the model's (99x99 and 49x49) with
  torch-compatible bicubic, as the original's loader does.
* A detection checkpoint's backbone (keys under ``backbone.``) loads the same way without drops.

Anything else unexpected, missing or of the wrong shape is a :class:`ConversionError` listing the keys.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.convert.mapping import ConversionReport, convert_state_dict
from lit_jax.convert.torch_reader import extract_state_dict, read_pth
from lit_jax.models.lit import LITS, LITTi
from lit_jax.models.registry import build_backbone
from lit_jax.ops.interpolate import bicubic_weights

log = logging.getLogger(__name__)

# Keys of the ImageNet classifiers that the detection backbones do not have.
_CLASSIFIER_ONLY = {
    "lit_ti": {
        r"cls_token": "classifier token",
        r"norm\.(weight|bias)": "classifier final norm",
        r"head\.(weight|bias)": "classification head",
    },
    "lit_s": {
        r"norm\.(weight|bias)": "classifier final norm (not the detection norm3)",
        r"head\.(weight|bias)": "classification head",
        r".*\.relative_position_index": "fixed index buffer, recomputed per input size",
    },
}
# Detection-only variables a classification checkpoint lacks.
_DETECTION_ONLY = {
    "lit_ti": {},
    "lit_s": {r"params/norm[123]/(scale|bias)": "detection output norms start as (1, 0)"},
}


def backbone_kind(model: nn.Module) -> str:
    if isinstance(model, LITTi):
        return "lit_ti"
    if isinstance(model, LITS):
        return "lit_s"
    raise TypeError(f"not a LIT backbone: {type(model).__name__}")


def resize_bias_table(table: np.ndarray, out_side: int) -> np.ndarray:
    """``(S*S, heads)`` relative-position-bias table -> ``(out_side**2, heads)``, torch bicubic.

    As the original loader: view as ``(heads, S, S)``, ``F.interpolate(size=(out, out), mode='bicubic',
    align_corners=False)``, back to rows. Computed in float64 with the same weights as the model's resize.
    """
    side = int(round(np.sqrt(table.shape[0])))
    if side * side != table.shape[0]:
        raise ValueError(f"bias table with {table.shape[0]} rows is not square")
    grid = table.astype(np.float64).reshape(side, side, -1)
    wy = bicubic_weights(side, out_side)
    out = np.einsum("oi,ijh->ojh", wy, grid)
    out = np.einsum("pj,ojh->oph", wy, out)
    return out.reshape(out_side * out_side, -1).astype(np.float32)


def _table_resizer(key: str, array: np.ndarray, want: tuple[int, ...]) -> Optional[np.ndarray]:
    if not key.endswith("relative_position_bias_table") or len(want) != 2 or array.shape[1:] != want[1:]:
        return None
    out_side = int(round(np.sqrt(want[0])))
    if out_side * out_side != want[0]:
        return None
    return resize_bias_table(array, out_side)


def backbone_shapes(model: nn.Module) -> dict[str, Any]:
    """The backbone's variable shapes (no computation), for checking a checkpoint against."""
    dummy = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), dummy)


def convert_backbone(
    state_dict: Mapping[str, np.ndarray], model: nn.Module, *, source: str, prefix: str = ""
) -> tuple[dict[str, Any], ConversionReport]:
    """Converts a LIT backbone state_dict (ImageNet layout, or under ``prefix`` in a detection checkpoint).

    Keys outside ``prefix`` are not looked at here (the detector converters handle them).
    """
    kind = backbone_kind(model)
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"{source}: no keys under {prefix!r}")
    variables, report = convert_state_dict(
        state_dict,
        backbone_shapes(model),
        source=source,
        drop=_CLASSIFIER_ONLY[kind],
        allow_missing=_DETECTION_ONLY[kind],
        resize=_table_resizer,
    )
    return variables, report


def load_pth(path: Union[str, os.PathLike], model: Union[str, nn.Module]) -> dict[str, Any]:
    """Loads a LIT ImageNet (or backbone-only) ``.pth`` for a backbone, without torch and without running code.

    Args:
      path: the checkpoint (a bare state_dict, or one nested under ``model`` / ``state_dict``).
      model: ``'lit_ti'``, ``'lit_s'`` or a backbone module (its sizes, e.g. the bias tables, are the target).
    Returns:
      ``{'params': ..., 'batch_stats': ...}`` as numpy arrays, ready for ``model.apply``.
    Raises:
      ConversionError listing unexpected / missing / mis-shaped keys; UnsafeCheckpointError or
      CheckpointFormatError for a file that is not a plain tensor checkpoint.
    """
    path = os.fspath(path)
    module = build_backbone(model) if isinstance(model, str) else model
    raw = read_pth(path)
    if isinstance(raw, Mapping) and "model" in raw and "state_dict" not in raw and backbone_kind(module) == "lit_ti":
        log.warning(
            "%s is nested under 'model': the original LIT-Ti loader (mmcv load_checkpoint) silently loads "
            "nothing from such a file; we load it.", path)
    state_dict = extract_state_dict(raw, path)
    prefix = "backbone." if any(k.startswith("backbone.") for k in state_dict) else ""
    variables, report = convert_backbone(state_dict, module, source=path, prefix=prefix)
    log.info("%s", report.summary())
    return variables
