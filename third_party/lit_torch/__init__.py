"""PyTorch reference of the original LIT backbones (ziplab/LIT), used ONLY by tests. No torchvision, no CUDA.

Detection backbones take x (B, 3, H, W) with H, W multiples of 32 and return 4 NCHW maps (strides 4/8/16/32).
"""
from .dcn import DeformConv2dPack, deform_conv2d_torch, perturb_offsets_
from .lit_s import LITSCls, LITSDet, relative_position_index, resize_rel_pos_table
from .lit_ti import LITTiCls, LITTiDet

_SAVE_RANDOM_NAMES = ("MODELS", "build_model", "count_params", "randomize_", "save_random_checkpoint")

__all__ = [
    "DeformConv2dPack", "deform_conv2d_torch", "perturb_offsets_",
    "LITTiDet", "LITTiCls", "LITSDet", "LITSCls",
    "relative_position_index", "resize_rel_pos_table",
    *_SAVE_RANDOM_NAMES,
]


def __getattr__(name):
    # Imported lazily so that `python -m third_party.lit_torch.save_random` does not pre-import its own module.
    if name in _SAVE_RANDOM_NAMES:
        from . import save_random
        return getattr(save_random, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
