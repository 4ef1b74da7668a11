"""The embedded default: RetinaNet LIT-Ti trained from scratch on the synthetic shapes dataset, on CPU.

The dataset is generated and prepared on first use (section ``synthetic``). Reduced from the COCO config so it
trains on 2 CPU cores in minutes (stated here and in README): images resized to 320x192 canvases, FPN and
head 64 channels with 2 stacked convs, 6 classes; the backbone is the LIT-Ti architecture at full width and
depth. Everything else (assigner, focal loss, AdamW, warmup, step schedule) is the COCO config's.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from base_retinanet import retinanet_config  # noqa: E402


def get_config():
    c = retinanet_config("lit_ti")
    c.synthetic = ml_collections.ConfigDict({
        "root": "data", "train": 400, "val": 50, "seed": 0, "max_side": 320,
    })
    c.model.pretrained = ""
    # The LIT-Ti architecture, spelled out so tests and users can shrink it with --config overrides.
    c.model.backbone_args.embed_dims = (64, 128, 320, 512)
    c.model.backbone_args.depths = (3, 4, 6, 3)
    c.model.backbone_args.num_heads = (1, 2, 5, 8)
    c.model.num_classes = 6
    c.model.fpn_channels = 64
    c.model.head.feat_channels = 64
    c.model.head.stacked_convs = 2
    # data.data_dir / data.dataset are set by lit_jax.main from the synthetic section.
    c.data.img_scale = (320, 192)
    c.data.global_batch_size = 8
    c.data.eval_global_batch_size = 8
    c.data.shuffle_buffer = 256
    c.optimizer.lr = 1e-3
    c.schedule.epochs = 12
    c.schedule.warmup_iters = 100
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 200
    c.train.eval_every_epochs = 4
    c.eval.mode = "bucket"
    return c
