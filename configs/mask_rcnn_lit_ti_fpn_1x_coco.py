"""Mask R-CNN LIT-Ti, 1x schedule on COCO 2017 (the original's mask_rcnn_lit_ti_fpn_1x_coco; 42.0 box / 39.1
mask AP)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from base_mask_rcnn import mask_rcnn_config  # noqa: E402


def get_config():
    c = mask_rcnn_config("lit_ti")
    # LIT_Ti(**kwargs) ignores its config kwargs: drop path is the hard-coded 0.1, nothing frozen.
    c.model.backbone_args.drop_path_rate = 0.1
    c.model.pretrained = "weights/lit_ti"
    c.optimizer.lr = 2e-4
    c.optimizer.weight_decay = 1e-4  # on every parameter, as the original Ti config
    return c
