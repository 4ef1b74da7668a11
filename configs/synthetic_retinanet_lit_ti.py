"""The embedded default: RetinaNet LIT-Ti trained from scratch on the synthetic shapes dataset, on CPU.

The dataset is generated and prepared on first use (section ``synthetic``). Reduced from the COCO config so the
whole job (data, training, evaluation) finishes in about 13 minutes on 2 CPU cores, as README states:
* backbone: LIT-Ti widths and heads, but depths 1/1/2/1 instead of 3/4/6/3 (the full depth triples the step
  time on CPU); set ``--config.model.backbone_args.depths="(3, 4, 6, 3)"`` for the full architecture;
* images resized to 320x192 canvases; FPN and head 64 channels with 2 stacked convs; 6 classes;
* AdamW lr 3e-4 with gradient clipping at norm 5 and a 100-step warmup: without ImageNet weights, the original's
  lr 1e-4 learns too slowly for a 12-epoch CPU run, and lr 1e-3 without clipping diverged (docs/benchmarks.md);
* BatchNorm statistics and loss normaliser per 2-image group, assigner, focal loss, step schedule: as COCO.
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
    # LIT-Ti widths and heads; depth reduced for CPU (see above). Spelled out so it can be overridden.
    c.model.backbone_args.embed_dims = (64, 128, 320, 512)
    c.model.backbone_args.depths = (1, 1, 2, 1)
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
    c.optimizer.lr = 3e-4
    c.optimizer.grad_clip = 5.0
    c.schedule.epochs = 12
    c.schedule.warmup_iters = 100
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 200
    c.train.eval_every_epochs = 0  # evaluate once, at the end
    c.eval.mode = "bucket"
    return c
