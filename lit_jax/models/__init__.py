"""Flax models: the LIT backbones, FPN and the detectors."""

from lit_jax.models.fpn import FPN
from lit_jax.models.lit import LITS, LITTi
from lit_jax.models.registry import backbone_names, build_backbone, build_detector
from lit_jax.models.retinanet import RetinaHead, RetinaNet, RetinaNetConfig, RetinaNetModule

__all__ = [
    "FPN", "LITS", "LITTi", "RetinaHead", "RetinaNet", "RetinaNetConfig", "RetinaNetModule",
    "backbone_names", "build_backbone", "build_detector",
]
