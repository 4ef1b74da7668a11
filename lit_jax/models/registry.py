"""Name -> model constructors, so configs and tools refer to architectures by name."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from lit_jax.models.lit import LITS, LITTi

_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "lit_ti": LITTi,
    "lit_s": LITS,
}


def backbone_names() -> list[str]:
    return sorted(_BACKBONES)


def build_backbone(name: str, **overrides: Any) -> nn.Module:
    """Builds a LIT backbone by name (``'lit_ti'`` or ``'lit_s'``) with field overrides.

    The module's ``apply(variables, images, train=False)`` takes NHWC float images ``(B, H, W, 3)`` and returns
    the 4 stage feature maps, NHWC, at strides 4/8/16/32. ``variables`` holds ``params`` and ``batch_stats``;
    in training pass ``train=True, mutable=['batch_stats'], rngs={'dropout': key}``.

    Raises ValueError naming the unknown backbone or the unknown override keys.
    """
    try:
        cls = _BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {backbone_names()}") from None
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for backbone {name!r}; known: {sorted(fields)}")
    return cls(**overrides)


# Model config keys understood by build_detector (ml_collections ConfigDict or a plain mapping).
_DETECTOR_KEYS = {"type", "backbone", "backbone_args", "num_classes", "fpn_channels", "head", "train_test", "dtype",
                  "pretrained", "load_from"}


def _as_dict(node: Any) -> dict:
    if node is None:
        return {}
    if hasattr(node, "to_dict"):
        return node.to_dict()
    return dict(node)


def build_detector(config: Any):
    """Builds a detector from a config (``config.model`` or the model section itself).

    Model section fields:
      type: ``'retinanet'`` or ``'mask_rcnn'``.
      backbone: ``'lit_ti'`` | ``'lit_s'``; backbone_args: overrides for :func:`build_backbone`.
      num_classes (80), fpn_channels (256), dtype (``'float32'`` | ``'bfloat16'``).
      pretrained / load_from: read by the trainer (converted ImageNet backbone / a whole detector), not here.
      head: RetinaHead fields (``feat_channels``, ``stacked_convs``); Mask R-CNN: ``fc_out_channels``,
        ``mask_conv_channels``.
      train_test: fields of :class:`lit_jax.models.retinanet.RetinaNetConfig` (assigner thresholds, focal
        parameters, ``loss_group_size``, ``nms_pre``, ``score_thr``, ``iou_thr``, ``max_per_img``) or of
        :class:`lit_jax.models.mask_rcnn.MaskRCNNConfig`.
    An unknown key anywhere is a ValueError naming it.
    """
    import jax.numpy as jnp

    from lit_jax.models.fpn import FPN
    from lit_jax.models.retinanet import RetinaHead, RetinaNet, RetinaNetConfig, RetinaNetModule

    model_cfg = _as_dict(config["model"] if "model" in config else config)
    unknown = sorted(set(model_cfg) - _DETECTOR_KEYS)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(_DETECTOR_KEYS)}")
    kind = model_cfg.get("type", "retinanet")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.get("dtype", "float32")]
    num_classes = int(model_cfg.get("num_classes", 80))
    backbone_args = _as_dict(model_cfg.get("backbone_args"))
    backbone_args.setdefault("dtype", dtype)
    backbone = build_backbone(model_cfg.get("backbone", "lit_ti"), **backbone_args)
    if kind == "mask_rcnn":
        return _build_mask_rcnn(model_cfg, backbone, num_classes, dtype)
    if kind != "retinanet":
        raise ValueError(f"unknown detector type {kind!r}; known: ['mask_rcnn', 'retinanet']")
    head_args = _subsection(model_cfg, "head", {"feat_channels", "stacked_convs"}, kind)
    tt_args = _subsection(model_cfg, "train_test", set(RetinaNetConfig.__dataclass_fields__), kind)
    cfg = RetinaNetConfig(num_classes=num_classes, **tt_args)
    neck = FPN(out_channels=int(model_cfg.get("fpn_channels", 256)), num_outs=5, start_level=1,
               add_extra_convs="on_input", dtype=dtype)
    head = RetinaHead(num_classes=num_classes, num_anchors=9, dtype=dtype, **head_args)
    return RetinaNet(RetinaNetModule(backbone=backbone, neck=neck, bbox_head=head), cfg)


def _subsection(model_cfg: dict, name: str, known: set, kind: str) -> dict:
    """``model.<name>`` as a dict, after checking that every key is one the ``kind`` detector knows."""
    args = _as_dict(model_cfg.get(name))
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown model.{name} key(s) {unknown} for {kind}; known: {sorted(known)}")
    return args


def _build_mask_rcnn(model_cfg: dict, backbone, num_classes: int, dtype):
    """Mask R-CNN: ``train_test`` takes :class:`MaskRCNNConfig` fields; ``head`` the widths
    ``fc_out_channels`` (1024) and ``mask_conv_channels`` (256)."""
    from lit_jax.models.mask_rcnn import MaskRCNNConfig, build_mask_rcnn

    head_args = _subsection(model_cfg, "head", {"fc_out_channels", "mask_conv_channels"}, "mask_rcnn")
    tt_args = _subsection(model_cfg, "train_test", set(MaskRCNNConfig.__dataclass_fields__), "mask_rcnn")
    return build_mask_rcnn(backbone, num_classes=num_classes, dtype=dtype,
                           cfg=MaskRCNNConfig(num_classes=num_classes, **tt_args),
                           fpn_channels=int(model_cfg.get("fpn_channels", 256)), **head_args)
