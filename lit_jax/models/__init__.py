"""Flax models: the LIT backbones (and, as they land, FPN and the detectors)."""

from lit_jax.models.lit import LITS, LITTi
from lit_jax.models.registry import backbone_names, build_backbone

__all__ = ["LITS", "LITTi", "backbone_names", "build_backbone"]
