"""Pure, jit-able array ops with mmdetection 2.x / PyTorch semantics (shapes in each docstring)."""

from lit_jax.ops.anchors import (
    AnchorConfig, base_anchors, feature_sizes, grid_anchors, multilevel_anchors, multilevel_valid_flags,
    retinanet_anchor_config, rpn_anchor_config, valid_flags,
)
from lit_jax.ops.assign import AssignResult, SampleResult, max_iou_assign, random_sample
from lit_jax.ops.boxes import box_iou, clip_boxes, decode_deltas, encode_deltas
from lit_jax.ops.deform_conv import deform_conv2d
from lit_jax.ops.interpolate import bicubic_weights, bilinear_weights, resize_bicubic, resize_bilinear
from lit_jax.ops.losses import (
    binary_cross_entropy_with_logits, l1_loss, retinanet_normalizer, sigmoid_focal_loss, softmax_cross_entropy,
)
from lit_jax.ops.nms import Detections, batched_nms, multiclass_nms, topk_per_level
from lit_jax.ops.mask_paste import paste_mask_probs, paste_masks
from lit_jax.ops.mask_targets import batched_mask_targets_from_crops, mask_targets_from_crops
from lit_jax.ops.roi_align import map_roi_levels, multilevel_roi_align, roi_align
