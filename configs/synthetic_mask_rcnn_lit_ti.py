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

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from base_mask_rcnn import mask_rcnn_config  # noqa: E402


def get_config():
    c = mask_rcnn_config("lit_ti")
    c.synthetic = ml_collections.ConfigDict({
        "root": "data", "train": 400, "val": 50, "seed": 0, "max_side": 320,
    })
    c.model.pretrained = ""
    c.model.backbone_args.embed_dims = (64, 128, 320, 512)
    c.model.backbone_args.depths = (1, 1, 2, 1)
    c.model.backbone_args.num_heads = (1, 2, 5, 8)
    c.model.num_classes = 6
    c.model.fpn_channels = 64
    c.model.head.fc_out_channels = 256
    c.model.head.mask_conv_channels = 64
    c.model.train_test.rcnn_num_samples = 128
    c.model.train_test.rpn_train_nms_pre = 1000
    c.model.train_test.rpn_train_max_per_img = 300
    c.data.img_scale = (320, 192)
    c.data.global_batch_size = 8
    c.data.eval_global_batch_size = 8
    c.data.shuffle_buffer = 256
    c.optimizer.lr = 3e-4
    c.optimizer.grad_clip = 5.0
    c.schedule.epochs = 12
    c.schedule.warmup_iters = 100
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 200
    c.train.eval_every_epochs = 0  # evaluate once, at the end
    c.eval.mode = "bucket"
    return c
