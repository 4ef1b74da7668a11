"""Random-but-nontrivial LIT DETECTOR checkpoints in mmdet 2.11's layout (test fixtures only).

    python -m third_party.lit_torch.save_detector --kind retinanet_lit_ti --out X.pth [--seed 0]

The file is ``{'meta': {'mmdet_version': '2.11.0', 'CLASSES': (80 COCO names), 'lit_torch_random': {...}},
'state_dict': {backbone.*, neck.*, bbox_head.*}}``.

The backbone is built and randomized exactly as ``save_random_checkpoint(name, seed=seed)`` does (same seeds, so its
tensors are identical); the neck and head get:

* conv weights ~ N(0, gain^2 / fan_in) (gain 1 for the FPN, sqrt(2) for the ReLU tower convs of the head, 0.5 for
  ``retina_cls`` and 0.25 for ``retina_reg`` so logits/deltas stay moderate);
* conv biases 0.1 * randn; ``retina_cls`` bias ``-log(99) + 0.5 * randn + cls_bias_shift`` so that a
  fraction of the sigmoid scores exceeds 0.05.

Mask R-CNN kinds ('mask_rcnn_lit_ti' / 'mask_rcnn_lit_s') save ``{backbone.*, neck.*, rpn_head.*, roi_head.*}``; their
neck and heads are randomized by ``randomize_mask_rcnn_heads_``.
"""
from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from typing import Dict, Optional

import torch
import torch.nn as nn

from .dcn import perturb_offsets_
from .mask_rcnn import MaskRCNNRef
from .retina_head import PRIOR_BIAS
from .retinanet import RetinaNetRef
from .save_random import count_params, randomize_

__all__ = ["COCO_CLASSES", "DETECTORS", "build_detector", "randomize_neck_head_", "randomize_mask_rcnn_heads_",
           "save_random_detector", "main"]

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
assert len(COCO_CLASSES) == 80

# kind -> backbone name
DETECTORS = {
    "retinanet_lit_ti": "lit_ti",
    "retinanet_lit_s": "lit_s",
    "mask_rcnn_lit_ti": "lit_ti",
    "mask_rcnn_lit_s": "lit_s",
}


def build_detector(kind: str, num_classes: int = 80) -> nn.Module:
    k = kind.lower().replace("-", "_")
    if k not in DETECTORS:
        raise ValueError(f"unknown detector kind {kind!r}; known: {sorted(DETECTORS)}")
    if k.startswith("mask_rcnn"):
        return MaskRCNNRef(DETECTORS[k], num_classes=num_classes)
    return RetinaNetRef(DETECTORS[k], num_classes=num_classes)


@torch.no_grad()
def randomize_neck_head_(model: nn.Module, seed: int = 0, cls_bias_shift: float = 0.0) -> nn.Module:
    """Randomize ``model.neck`` and ``model.bbox_head`` convs in place (see the module docstring).

    For a ``MaskRCNNRef`` this defers to ``randomize_mask_rcnn_heads_`` (neck, rpn_head, roi_head)."""
    if isinstance(model, MaskRCNNRef):
        return randomize_mask_rcnn_heads_(model, seed=seed, cls_bias_shift=cls_bias_shift)
    gen = torch.Generator().manual_seed(int(seed))

    def fill(conv: nn.Conv2d, gain: float, bias_mean: float = 0.0, bias_std: float = 0.1) -> None:
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (gain / math.sqrt(fan_in)))
        conv.bias.copy_(bias_mean + bias_std * torch.randn(conv.bias.shape, generator=gen))

    for _, m in model.neck.named_modules():
        if isinstance(m, nn.Conv2d):
            fill(m, 1.0)
    head = model.bbox_head
    for tower in (head.cls_convs, head.reg_convs):
        for cm in tower:
            fill(cm.conv, math.sqrt(2.0))
    fill(head.retina_cls, 0.5, bias_mean=PRIOR_BIAS + cls_bias_shift, bias_std=0.5)
    fill(head.retina_reg, 0.25)
    return model


@torch.no_grad()
def randomize_mask_rcnn_heads_(model: nn.Module, seed: int = 0, cls_bias_shift: float = 0.0) -> nn.Module:
    """Randomize a ``MaskRCNNRef``'s ``neck``, ``rpn_head`` and ``roi_head`` in place, with moderate magnitudes:

    * FPN convs: N(0, 1/fan_in), bias 0.1*randn;
    * ``rpn_conv`` gain sqrt(2); ``rpn_cls`` gain 1, bias ``0.5*randn`` (objectness spread around 0.5);
      ``rpn_reg`` gain 0.25 (small box deltas);
    * ``shared_fcs`` gain sqrt(2) (ReLU), bias 0.1*randn; ``fc_cls`` gain 1 with a background bias of
      ``2 - cls_bias_shift`` and foreground biases ``0.2*randn + cls_bias_shift`` so that some foreground softmax
      scores pass 0.05; ``fc_reg`` gain 0.5 (deltas x stds stay small);
    * mask head convs / upsample gain sqrt(2); ``conv_logits`` gain 1, bias ``0.5*randn`` (sigmoid spread around 0.5).
    """
    gen = torch.Generator().manual_seed(int(seed))

    def fill(m: nn.Module, gain: float, bias_mean: float = 0.0, bias_std: float = 0.1) -> None:
        w = m.weight
        # ConvTranspose2d (in, out, 2, 2) with stride 2: each output pixel sums `in` terms
        fan_in = w.shape[0] if isinstance(m, nn.ConvTranspose2d) else w[0].numel()
        w.copy_(torch.randn(w.shape, generator=gen) * (gain / math.sqrt(fan_in)))
        m.bias.copy_(bias_mean + bias_std * torch.randn(m.bias.shape, generator=gen))

    for _, m in model.neck.named_modules():
        if isinstance(m, nn.Conv2d):
            fill(m, 1.0)
    rpn = model.rpn_head
    fill(rpn.rpn_conv, math.sqrt(2.0))
    fill(rpn.rpn_cls, 1.0, bias_std=0.5)
    fill(rpn.rpn_reg, 0.25)
    bh = model.roi_head.bbox_head
    for fc in bh.shared_fcs:
        fill(fc, math.sqrt(2.0))
    fill(bh.fc_cls, 1.0, bias_mean=cls_bias_shift, bias_std=0.2)
    bh.fc_cls.bias[-1] = 2.0 - cls_bias_shift  # background column (last)
    fill(bh.fc_reg, 0.5)
    mh = model.roi_head.mask_head
    for cm in mh.convs:
        fill(cm.conv, math.sqrt(2.0))
    fill(mh.upsample, math.sqrt(2.0))
    fill(mh.conv_logits, 1.0, bias_std=0.5)
    return model


def save_random_detector(kind: str, path: Optional[str], seed: int = 0, offset_scale: float = 1.0,
                         cls_bias_shift: float = 0.0, meta: Optional[Dict] = None, num_classes: int = 80
                         ) -> nn.Module:
    """Build ``kind`` ('retinanet_lit_ti' / 'retinanet_lit_s' / 'mask_rcnn_lit_ti' / 'mask_rcnn_lit_s'), randomize
    it (seeded), and ``torch.save`` it as an mmdet checkpoint to ``path`` (``None``: do not write). Returns the model
    in eval mode; its ``state_dict()`` equals the saved ``state_dict``."""
    torch.manual_seed(int(seed))
    model = build_detector(kind, num_classes)  # the backbone is constructed first: same RNG draws as save_random_checkpoint
    randomize_(model.backbone, seed=seed + 1)
    if offset_scale:
        perturb_offsets_(model.backbone, scale=offset_scale, seed=seed + 2)
    randomize_neck_head_(model, seed=seed + 3, cls_bias_shift=cls_bias_shift)
    model.eval()
    sd = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    info = {
        "mmdet_version": "2.11.0",
        "CLASSES": COCO_CLASSES if num_classes == 80 else tuple(f"class_{i}" for i in range(num_classes)),
        "lit_torch_random": {"kind": kind, "seed": int(seed), "offset_scale": float(offset_scale),
                             "cls_bias_shift": float(cls_bias_shift)},
    }
    if meta:
        info.update(meta)
    if path is not None:
        torch.save({"meta": info, "state_dict": sd}, path)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=sorted(DETECTORS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offset-scale", type=float, default=1.0)
    a = ap.parse_args(argv)
    model = save_random_detector(a.kind, a.out, seed=a.seed, offset_scale=a.offset_scale)
    print(f"saved {a.kind} ({count_params(model):,} params) to {a.out}")


if __name__ == "__main__":
    main()
