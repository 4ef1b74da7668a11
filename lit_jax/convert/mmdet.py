"""Import of the released mmdetection 2.x LIT detector checkpoints (``{'meta', 'state_dict'}``).

Keys ``backbone.*``, ``neck.*`` and ``bbox_head.*`` (RetinaNet) map onto the detector's Flax module by the same
mechanical rule as the backbones (:mod:`lit_jax.convert.mapping`); every key must be used and every variable
present, or the error lists them. The checkpoint's ``meta`` (mmdet version, class names, config text) is
returned for the log and never executed.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Union

import jax
import numpy as np

from lit_jax.convert.mapping import ConversionReport, convert_state_dict
from lit_jax.convert.torch_reader import extract_state_dict, read_pth

log = logging.getLogger(__name__)


def detector_shapes(detector) -> dict[str, Any]:
    """The detector's variable shapes (no computation); sizes do not depend on the input."""
    return jax.eval_shape(lambda k: detector.init(k, (224, 224)), jax.random.PRNGKey(0))


def convert_detector(state_dict: Mapping[str, np.ndarray], detector, *, source: str
                     ) -> tuple[dict[str, Any], ConversionReport]:
    """Converts a full mmdet detector state_dict for ``detector`` (from :func:`build_detector`)."""
    return convert_state_dict(state_dict, detector_shapes(detector), source=source)


def load_mmdet_pth(path: Union[str, os.PathLike], detector) -> dict[str, Any]:
    """Reads a released mmdet checkpoint (without torch, without running code) into detector variables."""
    path = os.fspath(path)
    raw = read_pth(path, allow_unknown_as_placeholder=True)
    meta = raw.get("meta", {}) if isinstance(raw, Mapping) else {}
    if isinstance(meta, Mapping) and meta:
        log.info("%s: mmdet_version=%s, %s classes", path, meta.get("mmdet_version"),
                 len(meta.get("CLASSES", ()) or ()))
    variables, report = convert_detector(extract_state_dict(raw, path), detector, source=path)
    log.info("%s", report.summary())
    return variables
