"""Mask R-CNN LIT-S, 1x schedule on COCO 2017 (the original's mask_rcnn_lit_s_fpn_1x_coco; 42.9 box / 39.6
mask AP)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from base_mask_rcnn import mask_rcnn_config  # noqa: E402


def get_config():
    c = mask_rcnn_config("lit_s")
    c.model.backbone_args.drop_path_rate = 0.2
    c.model.backbone_args.use_checkpoint = True
    c.model.pretrained = "weights/lit_s"
    c.optimizer.lr = 2e-4
    c.optimizer.weight_decay = 1e-4
    # No decay on norms (LayerNorms and the DTM BatchNorms 'norm_layer') and the relative position tables.
    c.optimizer.no_decay_keywords = ("norm", "relative_position_bias_table")
    # The original trains LIT-S with apex AMP O1 (fp16 autocast, dynamic loss scale); on GPU use bfloat16.
    c.model.dtype = "float32"
    return c
