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


def read_mmdet_checkpoint(path: Union[str, os.PathLike], detector
                          ) -> tuple[dict[str, Any], dict, ConversionReport]:
    """Reads a released mmdet checkpoint (without torch, without running code): ``(variables, meta, report)``,
    where ``meta`` is the checkpoint's ``meta`` dict (``CLASSES``, ``mmdet_version``, ...; ``{}`` when absent)."""
    path = os.fspath(path)
    raw = read_pth(path, allow_unknown_as_placeholder=True)
    meta = raw.get("meta", {}) if isinstance(raw, Mapping) else {}
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    if meta:
        log.info("%s: mmdet_version=%s, %s classes", path, meta.get("mmdet_version"),
                 len(meta.get("CLASSES", ()) or ()))
    variables, report = convert_detector(extract_state_dict(raw, path), detector, source=path)
    log.info("%s", report.summary())
    return variables, meta, report


def load_mmdet_pth(path: Union[str, os.PathLike], detector) -> dict[str, Any]:
    """The detector variables of a released mmdet checkpoint (see :func:`read_mmdet_checkpoint`)."""
    return read_mmdet_checkpoint(path, detector)[0]


# The released LIT checkpoints by name: the model section of the config each was trained with.
RELEASED_DETECTORS = {
    "retinanet_lit_ti": {"type": "retinanet", "backbone": "lit_ti"},
    "retinanet_lit_s": {"type": "retinanet", "backbone": "lit_s"},
    "mask_rcnn_lit_ti": {"type": "mask_rcnn", "backbone": "lit_ti"},
    "mask_rcnn_lit_s": {"type": "mask_rcnn", "backbone": "lit_s"},
}


def convert_checkpoint(model: str, src: Union[str, os.PathLike]
                       ) -> tuple[dict[str, Any], ConversionReport, dict]:
    """Converts a ``.pth`` of a backbone (``'lit_ti'`` / ``'lit_s'``: ImageNet weights) or of a released detector
    (a key of :data:`RELEASED_DETECTORS`). Returns ``(variables, report, info)``; ``info`` is what
    ``conversion.json`` records: the model name, the report's fields and, for detectors, ``class_names`` and
    ``category_ids``
    (the checkpoint's ``meta['CLASSES']``; COCO's ids when those are COCO's 80 classes)."""
    import dataclasses

    from lit_jax.convert.lit import convert_backbone
    from lit_jax.evaluation.coco_classes import COCO_CLASSES, category_ids_for
    from lit_jax.models.registry import backbone_names, build_backbone, build_detector

    src = os.fspath(src)
    if model in RELEASED_DETECTORS:
        detector = build_detector(RELEASED_DETECTORS[model])
        variables, meta, report = read_mmdet_checkpoint(src, detector)
        names = meta.get("CLASSES")
        names = [str(n) for n in names] if isinstance(names, (list, tuple)) and names else list(COCO_CLASSES)
        return variables, report, {"model": model, **dataclasses.asdict(report), "class_names": names,
                                   "category_ids": category_ids_for(names)}
    if model not in backbone_names():
        raise ValueError(f"unknown model {model!r}; known: {backbone_names() + sorted(RELEASED_DETECTORS)}")
    state_dict = extract_state_dict(read_pth(src), src)
    prefix = "backbone." if any(k.startswith("backbone.") for k in state_dict) else ""
    variables, report = convert_backbone(state_dict, build_backbone(model), source=src, prefix=prefix)
    return variables, report, {"model": model, **dataclasses.asdict(report)}
