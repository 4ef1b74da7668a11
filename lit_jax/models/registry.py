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
