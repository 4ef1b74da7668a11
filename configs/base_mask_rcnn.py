"""Shared defaults of the Mask R-CNN configs: mmdet 2.11's mask_rcnn_r50_fpn_1x_coco as the LIT configs use it.

Not a config on its own: the files beside it call :func:`mask_rcnn_config` and change what differs. Data,
optimizer, schedule, train and eval sections are the RetinaNet base's (same runner, schedule and batch); the
model section and the mask data settings are Mask R-CNN's.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from base_retinanet import retinanet_config  # noqa: E402


def mask_rcnn_config(backbone: str) -> ml_collections.ConfigDict:
    c = retinanet_config(backbone)
    c.model = ml_collections.ConfigDict()
    c.model.type = "mask_rcnn"
    c.model.backbone = backbone
    c.model.backbone_args = ml_collections.ConfigDict({"drop_path_rate": 0.1})
    c.model.num_classes = 80
    c.model.fpn_channels = 256
    c.model.head = ml_collections.ConfigDict({"fc_out_channels": 1024, "mask_conv_channels": 256})
    # lit_jax.models.mask_rcnn.MaskRCNNConfig: the original's train_cfg / test_cfg.
    c.model.train_test = ml_collections.ConfigDict({
        "rpn_pos_iou_thr": 0.7, "rpn_neg_iou_thr": 0.3, "rpn_min_pos_iou": 0.3,
        "rpn_num_samples": 256, "rpn_pos_fraction": 0.5,
        "rpn_train_nms_pre": 2000, "rpn_train_max_per_img": 1000,
        "rcnn_pos_iou_thr": 0.5, "rcnn_neg_iou_thr": 0.5, "rcnn_min_pos_iou": 0.5,
        "rcnn_num_samples": 512, "rcnn_pos_fraction": 0.25,
        "rpn_nms_pre": 1000, "rpn_max_per_img": 1000, "rpn_iou_thr": 0.7,
        "score_thr": 0.05, "iou_thr": 0.5, "max_per_img": 100, "mask_thr": 0.5,
    })
    c.model.dtype = "float32"
    c.model.pretrained = ""
    # A whole detector to start from (fine-tuning): a released .pth, a convert_weights.py folder, a training
    # workdir or step folder. Layers whose shape depends on num_classes are re-initialised when it differs.
    c.model.load_from = ""
    # GT masks travel as 56x56 crops over each GT box; the RoI targets (28x28) are resampled from them.
    # 255-level crops agree with full-resolution targets at mean IoU 0.996 on the synthetic set, binary
    # crops at 0.979 (tests/ops/test_mask_targets.py).
    c.data.with_masks = True
    c.data.mask_size = 56
    c.data.mask_binary = False
    c.optimizer.lr = 2e-4
    c.optimizer.weight_decay = 1e-4
    return c
