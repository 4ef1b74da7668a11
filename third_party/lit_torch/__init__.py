"""PyTorch reference of the original LIT backbones (ziplab/LIT), used ONLY by tests. No torchvision, no CUDA.

Detection backbones take x (B, 3, H, W) with H, W multiples of 32 and return 4 NCHW maps (strides 4/8/16/32).
"""
from .dcn import DeformConv2dPack, deform_conv2d_torch, perturb_offsets_
from .lit_s import LITSCls, LITSDet, relative_position_index, resize_rel_pos_table
from .lit_ti import LITTiCls, LITTiDet

from .fpn import FPN, ConvModule
from .retina_head import RetinaHead
from .retinanet import (RetinaNetRef, anchors_ref, base_anchors_ref, batched_nms_ref, bbox2delta_ref,
                        delta2bbox_ref, multiclass_nms_ref, nms_ref, retinanet_simple_test_ref)
from .roi_align_ref import bilinear_interpolate_ref, map_roi_levels_ref, multilevel_roi_align_ref, roi_align_ref
from .mask_rcnn import (FCNMaskHead, MaskRCNNRef, RPNHead, Shared2FCBBoxHead, StandardRoIHeadRef, bbox_forward_ref,
                        mask_forward_ref, mask_rcnn_simple_test_ref, paste_masks_ref, rcnn_get_bboxes_ref,
                        rpn_anchors_ref, rpn_proposals_ref)

_SAVE_RANDOM_NAMES = ("MODELS", "build_model", "count_params", "randomize_", "save_random_checkpoint")
_SAVE_DETECTOR_NAMES = ("COCO_CLASSES", "DETECTORS", "build_detector", "randomize_neck_head_",
                        "save_random_detector", "randomize_mask_rcnn_heads_")

__all__ = [
    "DeformConv2dPack", "deform_conv2d_torch", "perturb_offsets_",
    "LITTiDet", "LITTiCls", "LITSDet", "LITSCls",
    "relative_position_index", "resize_rel_pos_table",
    *_SAVE_RANDOM_NAMES,
    "FPN", "ConvModule", "RetinaHead", "RetinaNetRef",
    "anchors_ref", "base_anchors_ref", "delta2bbox_ref", "bbox2delta_ref",
    "nms_ref", "batched_nms_ref", "multiclass_nms_ref", "retinanet_simple_test_ref",
    *_SAVE_DETECTOR_NAMES,
    "roi_align_ref", "bilinear_interpolate_ref", "map_roi_levels_ref", "multilevel_roi_align_ref",
    "RPNHead", "Shared2FCBBoxHead", "FCNMaskHead", "StandardRoIHeadRef", "MaskRCNNRef",
    "rpn_anchors_ref", "rpn_proposals_ref", "bbox_forward_ref", "mask_forward_ref", "rcnn_get_bboxes_ref",
    "paste_masks_ref", "mask_rcnn_simple_test_ref",
]


def __getattr__(name):
    # Imported lazily so that `python -m third_party.lit_torch.save_random` (or `.save_detector`) does not
    # pre-import its own module.
    if name in _SAVE_RANDOM_NAMES:
        from . import save_random
        return getattr(save_random, name)
    if name in _SAVE_DETECTOR_NAMES:
        from . import save_detector
        return getattr(save_detector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
