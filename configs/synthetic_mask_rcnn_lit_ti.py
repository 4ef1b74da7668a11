"""Mask R-CNN LIT-Ti trained from scratch on the synthetic shapes dataset, on CPU (boxes and masks).

The Mask R-CNN counterpart of ``synthetic_retinanet_lit_ti.py`` (same data, backbone reduction, optimizer
changes and reasons; see that file). Reduced further for CPU, all spelled out so they can be overridden:
* FPN 64 channels, box head FCs 256 wide, mask head convs 64 wide (original: 256 / 1024 / 256);
* RoI sampler 128 per image (original 512; 25% positives either way); train proposals: the top 1000 per level
  into NMS and 300 kept (original 2000 / 1000) -- the synthetic images hold at most a handful of objects;
* everything else (assigners, sampler rules, losses and their normalisers, test settings) as the COCO config.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from base_mask_rcnn import mask_rcnn_config  # noqa: E402
from base_synthetic import apply_synthetic_cpu_settings  # noqa: E402


def get_config():
    c = apply_synthetic_cpu_settings(mask_rcnn_config("lit_ti"))
    c.model.head.fc_out_channels = 256
    c.model.head.mask_conv_channels = 64
    c.model.train_test.rcnn_num_samples = 128
    c.model.train_test.rpn_train_nms_pre = 1000
    c.model.train_test.rpn_train_max_per_img = 300
    return c
