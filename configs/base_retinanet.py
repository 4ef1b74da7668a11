"""Shared defaults of the RetinaNet configs: mmdet 2.11's retinanet_r50_fpn_1x_coco as the LIT configs use it.

Not a config on its own: the files beside it call :func:`retinanet_config` and change what differs.
"""

import ml_collections


def retinanet_config(backbone: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.type = "retinanet"
    c.model.backbone = backbone
    c.model.backbone_args = ml_collections.ConfigDict({"drop_path_rate": 0.1})
    c.model.num_classes = 80
    c.model.fpn_channels = 256
    c.model.head = ml_collections.ConfigDict({"feat_channels": 256, "stacked_convs": 4})
    c.model.train_test = ml_collections.ConfigDict({
        "pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "min_pos_iou": 0.0,
        "nms_pre": 1000, "score_thr": 0.05, "iou_thr": 0.5, "max_per_img": 100,
    })
    c.model.dtype = "float32"
    # Converted ImageNet weights (scripts/convert_weights.py --dst DIR) or '' to train from scratch.
    c.model.pretrained = ""
    # A whole detector to start from (fine-tuning): a released .pth, a convert_weights.py folder, a training
    # workdir or step folder. Layers whose shape depends on num_classes are re-initialised when it differs.
    c.model.load_from = ""

    c.data = ml_collections.ConfigDict({
        "data_dir": "data/tfds",
        "dataset": "coco_instances/coco",
        "train_split": "train",
        "eval_split": "val",
        "img_scale": (1333, 800),
        # Training / bucket-evaluation canvases ((H, W), ...); None: landscape and portrait from img_scale.
        "canvases": None,
        "flip_prob": 0.5,
        "max_instances": 100,
        "global_batch_size": 16,
        "eval_global_batch_size": 8,
        "shuffle_buffer": 1024,
        "seed": 0,
    })

    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw", "lr": 1e-4, "weight_decay": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
        "no_decay_keywords": (), "grad_clip": 0.0,
        # Regular expressions of parameter paths the optimizer leaves untouched (e.g. ("^backbone/",));
        # model.backbone_args.frozen_stages freezes the backbone's first stages (BatchNorm statistics too).
        "frozen_params": (),
    })
    c.schedule = ml_collections.ConfigDict({
        "epochs": 12, "milestones": (8, 11), "gamma": 0.1, "warmup_iters": 500, "warmup_ratio": 0.001,
    })

    c.train = ml_collections.ConfigDict({
        "seed": 0,
        # Images whose BatchNorm statistics and loss normaliser are shared: the original's 2 images per GPU,
        # whatever our device count (a batch of 16 on one GPU behaves as the original's 8 x 2).
        "stats_group_size": 2,
        # The original did not scale the lr with the batch; when True, lr *= global_batch / reference_batch.
        "scale_lr": False,
        "reference_batch": 16,
        "max_steps": 0,  # 0: epochs x steps per epoch
        "log_every_steps": 50,
        "checkpoint_every_steps": 2000,
        "keep_checkpoints": 3,
        "eval_every_epochs": 1,
        # Batches read and put on the devices ahead of the step by a background thread (0: read in the step).
        "prefetch": 2,
    })

    c.eval = ml_collections.ConfigDict({
        # 'per_image': each image at its own 32-padded size as the original tests (one compile per shape,
        # cached); 'bucket': the training canvases, batched (faster, slightly different numbers).
        "mode": "per_image",
        "ann_file": "",  # COCO json for pycocotools; '' = the one the dataset was built from
        "classwise": False,  # also report (and log to TensorBoard) the AP of every class
        "show_num": 4,  # after training, draw the predictions on this many val images (workdir/predictions)
        "show_score_thr": 0.3,  # ... those scoring above this
    })
    return c
