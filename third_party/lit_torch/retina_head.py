"""PyTorch reference of mmdet 2.x ``RetinaHead`` (parity spec section 6), test reference only.

Keys: ``cls_convs.{0-3}.conv``, ``reg_convs.{0-3}.conv`` (3x3 p1, bias, ReLU), ``retina_cls`` (3x3 p1 -> A*C),
``retina_reg`` (3x3 p1 -> A*4). Output channels are ANCHOR-MAJOR: class ``c`` of anchor ``a`` is channel
``a*C + c``, delta ``k`` of anchor ``a`` is channel ``a*4 + k``; so ``permute(0, 2, 3, 1).reshape(N, -1, C)`` gives
rows in the flat anchor order ``(y*W + x)*A + a``.

Init (mmdet): ``normal_init(std=0.01)`` on every conv, biases 0, ``retina_cls`` bias ``-log((1-0.01)/0.01)``.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .fpn import ConvModule

__all__ = ["RetinaHead", "PRIOR_BIAS"]

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # mmcv bias_init_with_prob(0.01) = -log(99) = -4.59512


class RetinaHead(nn.Module):
    def __init__(self, num_classes: int = 80, in_channels: int = 256, feat_channels: int = 256,
                 stacked_convs: int = 4, num_anchors: int = 9, init: bool = True):
        super().__init__()
        self.num_classes = int(num_classes)
        self.cls_out_channels = self.num_classes  # sigmoid classifier: no background channel
        self.num_anchors = int(num_anchors)
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for i in range(stacked_convs):
            cin = in_channels if i == 0 else feat_channels
            self.cls_convs.append(ConvModule(cin, feat_channels, 3, padding=1, relu=True))
            self.reg_convs.append(ConvModule(cin, feat_channels, 3, padding=1, relu=True))
        self.retina_cls = nn.Conv2d(feat_channels, self.num_anchors * self.cls_out_channels, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, self.num_anchors * 4, 3, padding=1)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.retina_cls.bias, PRIOR_BIAS)

    def forward_single(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cls_feat = x
        reg_feat = x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs:
            reg_feat = conv(reg_feat)
        return self.retina_cls(cls_feat), self.retina_reg(reg_feat)

    def forward(self, feats: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """``feats``: the FPN levels (NCHW). Returns ``(cls_scores, bbox_preds)``, one NCHW map per level:
        (N, A*C, H, W) logits and (N, A*4, H, W) deltas."""
        cls_scores, bbox_preds = [], []
        for x in feats:
            c, b = self.forward_single(x)
            cls_scores.append(c)
            bbox_preds.append(b)
        return cls_scores, bbox_preds
