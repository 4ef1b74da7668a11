#!/usr/bin/env python
"""Run a LIT detector on one image and draw its detections (class names, scores) for a person to look at.

    python scripts/predict.py --config configs/synthetic_retinanet_lit_ti.py --checkpoint workdir/synthetic_retinanet_lit_ti \
        --image data/synthetic_coco/s0_400_50_320/val2017/000000000401.jpg --out pred.png
    python scripts/predict.py --config configs/retinanet_lit_ti_fpn_1x_coco.py --pth retinanet_lit_ti.pth --image a.jpg --out a_pred.png

The image goes through the original's test pipeline (cv2 decode, keep-ratio resize to data.img_scale with its
rounding, normalisation, zero padding to a multiple of 32) and is detected at its own padded size.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def preprocess(path: str, img_scale, size_divisor: int = 32):
    """-> (rgb uint8 original, images (1,Hp,Wp,3) float32, img_shape (1,2), scale_factor (1,4))."""
    import cv2

    from lit_jax.data.transforms import MEAN_RGB, STD_RGB, ceil_to, decode_resize_np

    with open(path, "rb") as f:
        data = f.read()
    resized, (h, w) = decode_resize_np(data, img_scale, name=path)
    original = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    new_h, new_w = resized.shape[:2]
    norm = (resized.astype(np.float32) - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STD_RGB, np.float32)
    padded = np.zeros((ceil_to(new_h, size_divisor), ceil_to(new_w, size_divisor), 3), np.float32)
    padded[:new_h, :new_w] = norm
    w_s, h_s = np.float32(new_w / w), np.float32(new_h / h)
    scale = np.asarray([[w_s, h_s, w_s, h_s]], np.float32)
    return original, padded[None], np.asarray([[new_h, new_w]], np.int32), scale


def main(argv=None) -> int:
    from lit_jax import cli

    p = cli.config_parser(__doc__)
    cli.add_model_source(p)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output image (png/jpg)")
    p.add_argument("--score_thr", type=float, default=0.3)
    args, config = cli.parse(p, argv)
    cli.setup_logging()

    import jax

    from lit_jax.evaluation.visualize import draw_detections, save_image
    from lit_jax.main import ensure_synthetic_dataset
    from lit_jax.train.trainer import Trainer

    try:
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"image {args.image} does not exist")
        original, images, img_shape, scale = preprocess(args.image, tuple(config.data.img_scale))
        ensure_synthetic_dataset(config)
        trainer = Trainer(config, os.getcwd())
        variables = trainer.load_variables(checkpoint=args.checkpoint, pth=args.pth)
        dets = jax.jit(trainer.detector.predict)(variables, images, {"img_shape": img_shape, "scale_factor": scale})
        names = class_names(config)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dets = dets._asdict() if hasattr(dets, "_asdict") else dict(dets)  # RetinaNet: Detections; Mask R-CNN: dict
    keep = np.asarray(dets["valid"][0])
    boxes, scores, labels = (np.asarray(dets[k][0])[keep] for k in ("boxes", "scores", "labels"))
    masks = None
    if "mask_probs" in dets:  # Mask R-CNN: masks pasted at the original size, as for evaluation
        masks = trainer.detector.paste(dets["mask_probs"][0], dets["mask_boxes"][0], original.shape[:2],
                                       dets["mask_valid"][0])[keep]
    drawn = draw_detections(original, boxes, scores, labels, names, score_thr=args.score_thr, masks=masks)
    save_image(args.out, drawn)
    shown = int(np.sum(scores > args.score_thr))
    print(f"{len(scores)} detections, {shown} above {args.score_thr} drawn to {args.out}")
    for b, s, l in sorted(zip(boxes.tolist(), scores.tolist(), labels.tolist()), key=lambda t: -t[1])[:10]:
        print(f"  {names[l] if l < len(names) else l}: {s:.3f} at [{b[0]:.1f}, {b[1]:.1f}, {b[2]:.1f}, {b[3]:.1f}]")
    return 0


def class_names(config) -> list[str]:
    """The dataset's category names when it is prepared here, else COCO's 80 (released checkpoints)."""
    try:
        from lit_jax.data.sources import open_source

        return list(open_source(config.data.data_dir, config.data.dataset).category_names)
    except Exception:  # no prepared dataset: released COCO checkpoints carry the COCO classes
        from lit_jax.evaluation.coco_classes import COCO_CLASSES

        return list(COCO_CLASSES)


if __name__ == "__main__":
    sys.exit(main())
