from lit_jax.ops.deform_conv import deform_conv2d
from lit_jax.ops.interpolate import resize_bilinear, resize_bicubic, bilinear_weights, bicubic_weights
from lit_jax.ops.boxes import box_iou, encode_deltas, decode_deltas, clip_boxes
from lit_jax.ops.anchors import (AnchorConfig, base_anchors, grid_anchors, multilevel_anchors,
                                 retinanet_anchor_config, rpn_anchor_config, valid_flags,
                                 multilevel_valid_flags, feature_sizes)
from lit_jax.ops.assign import max_iou_assign, random_sample, AssignResult, SampleResult
from lit_jax.ops.losses import (sigmoid_focal_loss, l1_loss, binary_cross_entropy_with_logits,
                                softmax_cross_entropy, retinanet_normalizer)
from lit_jax.ops.nms import batched_nms, multiclass_nms, topk_per_level, Detections
