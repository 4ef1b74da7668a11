"""Shared CPU-sized settings of the synthetic configs (not a config on its own).

:func:`apply_synthetic_cpu_settings` turns a COCO config into a from-scratch run on the generated shapes
dataset that fits 2 CPU cores; ``synthetic_retinanet_lit_ti.py`` explains each choice.
"""

import ml_collections


def apply_synthetic_cpu_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.synthetic = ml_collections.ConfigDict({
        "root": "data", "train": 400, "val": 50, "seed": 0, "max_side": 320,
    })
    c.model.pretrained = ""
    # LIT-Ti widths and heads; depth reduced for CPU. Spelled out so it can be overridden.
    c.model.backbone_args.embed_dims = (64, 128, 320, 512)
    c.model.backbone_args.depths = (1, 1, 2, 1)
    c.model.backbone_args.num_heads = (1, 2, 5, 8)
    c.model.num_classes = 6
    c.model.fpn_channels = 64
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
    c.eval.show_score_thr = 0.2  # a 12-epoch CPU run from scratch scores its detections low
    return c
