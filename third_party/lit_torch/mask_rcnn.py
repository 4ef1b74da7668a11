"""PyTorch reference of the LIT Mask R-CNN detectors and of their mmdet 2.11 test-time path (spec sections 3-5, 8-10).

Test reference only: plain torch, fp32, CPU.

Model ``MaskRCNNRef(backbone)`` (state_dict keys = the mmdet checkpoint keys, spec section 12):

* ``backbone.*``: LITTiDet / LITSDet;
* ``neck.*``: FPN(all 4 backbone widths, 256, num_outs=5, start_level=0), P6 = ``max_pool2d(P5, 1, stride=2)``;
* ``rpn_head.{rpn_conv, rpn_cls, rpn_reg}``: ``RPNHead``;
* ``roi_head.bbox_head.{shared_fcs.0, shared_fcs.1, fc_cls, fc_reg}``: ``Shared2FCBBoxHead``;
* ``roi_head.mask_head.{convs.0-3.conv, upsample, conv_logits}``: ``FCNMaskHead``.

Test path (``mask_rcnn_simple_test_ref``, = ``TwoStageDetector.simple_test(img, img_metas, rescale=True)`` for one
image with the LIT configs' test_cfg: rpn nms_pre 1000 / iou 0.7 / max_per_img 1000 / min_bbox_size 0; rcnn
score_thr 0.05 / iou 0.5 / max_per_img 100 / mask_thr_binary 0.5):

1. ``rpn_proposals_ref``: per level sigmoid, sort (only when the level has more than nms_pre anchors), keep the top
   nms_pre, decode (stds 1) + clip to img_shape, ``batched_nms`` with the level id as class, first max_per_img;
2. RoIs ``[0, x1, y1, x2, y2]``; RoIAlign 7x7 (P2-P5, sampling_ratio 0, aligned) -> bbox head;
   the y2 == 0 quirk (rows whose RoI y2 is exactly 0 get zero logits and deltas: mmdet 2.11 pads the batch with
   all-zero proposals and zeroes ``rois[..., -1] == 0``); softmax; class-specific decode (stds 0.1/0.1/0.2/0.2), clip
   to img_shape, divide by scale_factor; ``multiclass_nms`` (> 0.05, iou 0.5, 100) on the 80 foreground columns;
3. masks: mask RoIs = det boxes * scale_factor; detections whose rescaled y2 is exactly 0 are dropped from the mask
   branch (mmdet 2.11's ``det_bbox[..., -1] != 0``); RoIAlign 14x14 -> mask head -> sigmoid -> label channel;
   paste at ori_shape over the whole image (GPU path of ``_do_paste_mask``) with the boxes ``(det * sf) / sf``;
   ``>= 0.5``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .fpn import FPN, ConvModule
from .retinanet import (RETINANET_BACKBONES, _backbone_name, anchors_ref, batched_nms_ref, delta2bbox_ref,
                        multiclass_nms_ref)
from .roi_align_ref import FINEST_SCALE, ROI_STRIDES, multilevel_roi_align_ref

__all__ = [
    "RPN_STRIDES", "RCNN_STDS", "RPNHead", "Shared2FCBBoxHead", "FCNMaskHead", "StandardRoIHeadRef", "MaskRCNNRef",
    "rpn_anchors_ref", "rpn_proposals_ref", "bbox_forward_ref", "mask_forward_ref", "rcnn_get_bboxes_ref",
    "paste_masks_ref", "mask_rcnn_simple_test_ref",
]

RPN_STRIDES = (4, 8, 16, 32, 64)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


# ----------------------------------------------------------------------------------------------------------------
# Heads
class RPNHead(nn.Module):
    """mmdet ``RPNHead``: ``rpn_conv`` 3x3 p1 + ReLU, ``rpn_cls`` 1x1 -> A (sigmoid), ``rpn_reg`` 1x1 -> 4A.

    ``forward(feats) -> (cls_scores, bbox_preds)``, one NCHW map per level. Channel ``a`` is anchor ``a``; deltas are
    channel ``a*4 + k``. Init: normal(0, 0.01), bias 0."""

    def __init__(self, in_channels: int = 256, feat_channels: int = 256, num_anchors: int = 3, init: bool = True):
        super().__init__()
        self.num_anchors = int(num_anchors)
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, self.num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, self.num_anchors * 4, 1)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)

    def forward_single(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)

    def forward(self, feats: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        cls, reg = [], []
        for f in feats:
            c, r = self.forward_single(f)
            cls.append(c)
            reg.append(r)
        return cls, reg


class Shared2FCBBoxHead(nn.Module):
    """mmdet ``Shared2FCBBoxHead`` (= ConvFCBBoxHead with 2 shared fcs), ``reg_class_agnostic=False``.

    ``forward(roi_feats (N, C, 7, 7)) -> (cls_score (N, num_classes + 1), bbox_pred (N, 4 * num_classes))``;
    flatten in C,H,W order; ReLU after each shared fc; background is the LAST cls column."""

    def __init__(self, num_classes: int = 80, in_channels: int = 256, roi_feat_size: int = 7, fc_out: int = 1024,
                 init: bool = True):
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.roi_feat_size = int(roi_feat_size)
        flat = self.in_channels * self.roi_feat_size * self.roi_feat_size
        self.shared_fcs = nn.ModuleList([nn.Linear(flat, fc_out), nn.Linear(fc_out, fc_out)])
        self.fc_cls = nn.Linear(fc_out, self.num_classes + 1)
        self.fc_reg = nn.Linear(fc_out, 4 * self.num_classes)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # mmdet: xavier-uniform shared fcs, normal(0.01) fc_cls, normal(0.001) fc_reg, zero biases
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.normal_(self.fc_reg.weight, 0.0, 0.001)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """mmdet ``FCNMaskHead``: 4 x [conv3x3 256 + ReLU] -> ConvTranspose2d(256, 256, 2, stride 2) + ReLU ->
    ``conv_logits`` 1x1 -> num_classes. ``forward(roi_feats (N, 256, 14, 14)) -> (N, num_classes, 28, 28)`` logits."""

    def __init__(self, num_classes: int = 80, in_channels: int = 256, conv_out_channels: int = 256,
                 num_convs: int = 4, init: bool = True):
        super().__init__()
        self.num_classes = int(num_classes)
        self.convs = nn.ModuleList([
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, padding=1, relu=True)
            for i in range(num_convs)])
        self.upsample = nn.ConvTranspose2d(conv_out_channels, conv_out_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_out_channels, self.num_classes, 1)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # mmdet: ConvModule kaiming (fan_out, relu) for the convs; kaiming fan_out for upsample/conv_logits; bias 0
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        x = F.relu(self.upsample(x))
        return self.conv_logits(x)


class StandardRoIHeadRef(nn.Module):
    """``roi_head.*``: holds ``bbox_head`` and ``mask_head`` (the RoI extractors have no parameters)."""

    def __init__(self, num_classes: int = 80):
        super().__init__()
        self.bbox_head = Shared2FCBBoxHead(num_classes=num_classes)
        self.mask_head = FCNMaskHead(num_classes=num_classes)


class MaskRCNNRef(nn.Module):
    """LIT Mask R-CNN. ``forward(img)`` / ``extract_feat(img)`` return the 5 FPN maps (strides 4..64)."""

    def __init__(self, backbone: str = "lit_ti", num_classes: int = 80):
        super().__init__()
        name = _backbone_name(backbone)
        if name not in RETINANET_BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; known: {sorted(RETINANET_BACKBONES)}")
        cls, chans = RETINANET_BACKBONES[name]
        self.backbone_name = name
        self.num_classes = int(num_classes)
        self.backbone = cls()
        self.neck = FPN(list(chans), 256, num_outs=5, start_level=0)
        self.rpn_head = RPNHead(256, 256, 3)
        self.roi_head = StandardRoIHeadRef(num_classes)
        self.rpn_strides = RPN_STRIDES
        self.roi_strides = ROI_STRIDES

    def extract_feat(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.neck(self.backbone(img))

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.extract_feat(img)


# ----------------------------------------------------------------------------------------------------------------
# RPN proposals
def rpn_anchors_ref(feat_sizes: Sequence[Tuple[int, int]], strides: Sequence[int] = RPN_STRIDES) -> List[torch.Tensor]:
    """RPN anchors per level: scale 8, ratios (0.5, 1, 2), A = 3, corner-centred, row ``(y*W + x)*3 + a``."""
    return anchors_ref(feat_sizes, strides[:len(feat_sizes)], octave_base_scale=None, scales=(8,),
                       ratios=(0.5, 1.0, 2.0))


def _as_shape(img_shape) -> Tuple[int, int]:
    return int(img_shape[0]), int(img_shape[1])


@torch.no_grad()
def rpn_proposals_ref(model: MaskRCNNRef, feats: Sequence[torch.Tensor], img_shape, nms_pre: int = 1000,
                      max_per_img: int = 1000, iou_thr: float = 0.7, return_raw: bool = False):
    """mmdet 2.11 ``RPNHead.simple_test_rpn`` for ONE image (spec section 8).

    ``feats``: the 5 FPN maps (batch 1). Returns the proposals (K, 5) ``[x1, y1, x2, y2, score]`` sorted by score
    (K <= max_per_img); with ``return_raw`` also a dict: ``cls_scores`` / ``bbox_preds`` (raw per-level head maps),
    ``anchors`` (per level), ``scores`` / ``boxes`` / ``level_ids`` (the NMS candidates), ``keep`` (kept candidate
    indices)."""
    cls_scores, bbox_preds = model.rpn_head(feats)
    sizes = [tuple(c.shape[-2:]) for c in cls_scores]
    mlvl_anchors = rpn_anchors_ref(sizes, model.rpn_strides)
    all_scores, all_deltas, all_anchors, all_ids = [], [], [], []
    for lvl, (cs, bp, anchors) in enumerate(zip(cls_scores, bbox_preds, mlvl_anchors)):
        assert cs.shape[-2:] == bp.shape[-2:]
        scores = cs[0].permute(1, 2, 0).reshape(-1).sigmoid()
        deltas = bp[0].permute(1, 2, 0).reshape(-1, 4)
        if 0 < nms_pre < scores.shape[0]:
            ranked, order = torch.sort(scores, descending=True, stable=True)
            scores = ranked[:nms_pre]
            idx = order[:nms_pre]
            deltas = deltas[idx]
            anchors = anchors[idx]
        all_scores.append(scores)
        all_deltas.append(deltas)
        all_anchors.append(anchors)
        all_ids.append(torch.full((scores.shape[0],), lvl, dtype=torch.long))
    scores = torch.cat(all_scores)
    anchors = torch.cat(all_anchors)
    deltas = torch.cat(all_deltas)
    ids = torch.cat(all_ids)
    boxes = delta2bbox_ref(anchors, deltas, max_shape=_as_shape(img_shape))
    if boxes.numel() > 0:
        dets, keep = batched_nms_ref(boxes, scores, ids, iou_thr)
    else:
        dets, keep = boxes.new_zeros((0, 5)), torch.zeros((0,), dtype=torch.long)
    dets = dets[:max_per_img]
    keep = keep[:max_per_img]
    if return_raw:
        return dets, {"cls_scores": cls_scores, "bbox_preds": bbox_preds, "anchors": mlvl_anchors,
                      "scores": scores, "boxes": boxes, "level_ids": ids, "keep": keep}
    return dets


# ----------------------------------------------------------------------------------------------------------------
# RoI head
def bbox_forward_ref(model: MaskRCNNRef, feats: Sequence[torch.Tensor], rois: torch.Tensor,
                     return_feats: bool = False):
    """``StandardRoIHead._bbox_forward``: RoIAlign 7x7 on P2-P5 -> ``Shared2FCBBoxHead``.

    ``rois``: (R, 5) ``[b, x1, y1, x2, y2]``. Returns ``(cls_score (R, 81), bbox_pred (R, 320))`` (raw, no quirk),
    plus the RoI features (R, 256, 7, 7) with ``return_feats``."""
    roi_feats = multilevel_roi_align_ref(feats, rois, 7, model.roi_strides, 0, True, FINEST_SCALE)
    cls_score, bbox_pred = model.roi_head.bbox_head(roi_feats)
    return (cls_score, bbox_pred, roi_feats) if return_feats else (cls_score, bbox_pred)


def mask_forward_ref(model: MaskRCNNRef, feats: Sequence[torch.Tensor], rois: torch.Tensor,
                     return_feats: bool = False):
    """``StandardRoIHead._mask_forward``: RoIAlign 14x14 on P2-P5 -> ``FCNMaskHead``; (R, 80, 28, 28) logits."""
    roi_feats = multilevel_roi_align_ref(feats, rois, 14, model.roi_strides, 0, True, FINEST_SCALE)
    mask_pred = model.roi_head.mask_head(roi_feats)
    return (mask_pred, roi_feats) if return_feats else mask_pred


def _sf_tensor(scale_factor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(scale_factor, dtype=np.float32).reshape(4))


def rcnn_get_bboxes_ref(rois: torch.Tensor, cls_score: torch.Tensor, bbox_pred: torch.Tensor, img_shape,
                        scale_factor, score_thr: float = 0.05, iou_thr: float = 0.5, max_num: int = 100,
                        apply_y2_quirk: bool = True, return_raw: bool = False):
    """Test-time ``BBoxTestMixin.simple_test_bboxes`` + ``BBoxHead.get_bboxes(rescale=True)`` for one image.

    Applies the y2 == 0 quirk (``apply_y2_quirk``), softmax, class-specific decode with stds (0.1, 0.1, 0.2, 0.2),
    clip to img_shape, division by scale_factor, and ``multiclass_nms`` on the foreground columns.
    Returns ``(dets (K, 5), labels (K,))`` (+ a dict with ``scores`` (R, 81), ``boxes`` (R, 320)``, ``inds``)."""
    cls_score = cls_score.clone()
    bbox_pred = bbox_pred.clone()
    if apply_y2_quirk:
        pad = rois[:, -1] == 0
        cls_score[pad] = 0
        bbox_pred[pad] = 0
    scores = F.softmax(cls_score, dim=-1)
    boxes = delta2bbox_ref(rois[:, 1:5], bbox_pred, stds=RCNN_STDS, max_shape=_as_shape(img_shape))
    sf = _sf_tensor(scale_factor)
    boxes = boxes / sf.repeat(boxes.shape[-1] // 4)[None]
    dets, labels, inds = multiclass_nms_ref(boxes, scores[:, :-1], score_thr, iou_thr, max_num, return_inds=True)
    if return_raw:
        return dets, labels, {"scores": scores, "boxes": boxes, "inds": inds}
    return dets, labels


def paste_masks_ref(mask_probs: torch.Tensor, boxes: torch.Tensor, img_h: int, img_w: int) -> torch.Tensor:
    """mmdet ``_do_paste_mask(skip_empty=False)`` (the GPU path): paste (N, 28, 28) probabilities into the whole
    (img_h, img_w) image at ``boxes`` (N, 4). Returns (N, img_h, img_w) float32 (threshold it yourself)."""
    N = mask_probs.shape[0]
    boxes = boxes.float()
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    img_y = torch.arange(0, img_h, dtype=torch.float32) + 0.5
    img_x = torch.arange(0, img_w, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    img_x = torch.where(torch.isinf(img_x), torch.zeros_like(img_x), img_x)
    img_y = torch.where(torch.isinf(img_y), torch.zeros_like(img_y), img_y)
    gx = img_x[:, None, :].expand(N, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(N, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    out = F.grid_sample(mask_probs[:, None].float(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[:, 0]


@torch.no_grad()
def mask_rcnn_simple_test_ref(model: MaskRCNNRef, img: torch.Tensor, img_shape, scale_factor, ori_shape,
                              rpn_nms_pre: int = 1000, rpn_max_per_img: int = 1000, rpn_iou_thr: float = 0.7,
                              score_thr: float = 0.05, iou_thr: float = 0.5, max_num: int = 100,
                              mask_thr: float = 0.5, proposals: Optional[torch.Tensor] = None,
                              return_intermediate: bool = False):
    """mmdet 2.11 ``MaskRCNN.simple_test(img, img_metas, rescale=True)`` for ONE image (spec sections 8-10).

    ``img``: (1, 3, Hp, Wp) normalized and 32-padded; ``img_shape``: (h, w[, 3]) of the resized unpadded image;
    ``scale_factor``: (w_s, h_s, w_s, h_s); ``ori_shape``: (H0, W0[, 3]). ``proposals`` (K, 4 or 5) replaces the RPN
    output when given (to test the RoI stage on fixed RoIs).

    Returns ``(boxes (K, 4), scores (K,), labels (K,), masks (K, H0, W0) bool)`` in original coordinates, in the NMS
    order (descending score). Detections dropped from the mask branch (rescaled y2 == 0) get an all-False mask.
    With ``return_intermediate`` a 5th element, a dict:

    * ``feats``: the 5 FPN maps; ``rpn_cls_scores`` / ``rpn_bbox_preds``: raw RPN head maps per level;
      ``rpn_raw``: the ``rpn_proposals_ref`` raw dict (None when ``proposals`` was given);
    * ``proposals`` (K, 5 or 4); ``rois`` (K, 5); ``cls_score`` (K, 81) / ``bbox_pred`` (K, 320): raw bbox head
      outputs; ``scores`` (K, 81) after the quirk + softmax; ``det_candidates_boxes`` (K, 320) rescaled;
      ``nms_inds`` (flat ``row*80 + class`` of the detections);
    * ``mask_rois`` (M, 5); ``mask_valid`` (K,) bool; ``mask_pred`` (M, 80, 28, 28) logits; ``mask_probs``
      (M, 28, 28) sigmoid of the label channel; ``paste_boxes`` (M, 4) = ``(det * sf) / sf``;
      ``mask_soft`` (M, H0, W0) pasted probabilities.
    """
    assert img.shape[0] == 1, "one image"
    feats = model.extract_feat(img)
    inter: Dict[str, object] = {"feats": feats}
    if proposals is None:
        proposals, rpn_raw = rpn_proposals_ref(model, feats, img_shape, rpn_nms_pre, rpn_max_per_img, rpn_iou_thr,
                                               return_raw=True)
        inter.update(rpn_cls_scores=rpn_raw["cls_scores"], rpn_bbox_preds=rpn_raw["bbox_preds"], rpn_raw=rpn_raw)
    else:
        proposals = proposals.float()
        cls_scores, bbox_preds = model.rpn_head(feats)
        inter.update(rpn_cls_scores=cls_scores, rpn_bbox_preds=bbox_preds, rpn_raw=None)
    inter["proposals"] = proposals
    rois = torch.cat([proposals.new_zeros((proposals.shape[0], 1)), proposals[:, :4]], dim=1)
    inter["rois"] = rois
    cls_score, bbox_pred = bbox_forward_ref(model, feats, rois)
    inter.update(cls_score=cls_score, bbox_pred=bbox_pred)
    dets, labels, raw = rcnn_get_bboxes_ref(rois, cls_score, bbox_pred, img_shape, scale_factor, score_thr, iou_thr,
                                            max_num, return_raw=True)
    inter.update(scores=raw["scores"], det_candidates_boxes=raw["boxes"], nms_inds=raw["inds"])
    boxes, scores = dets[:, :4], dets[:, 4]
    H0, W0 = int(ori_shape[0]), int(ori_shape[1])
    masks = torch.zeros((boxes.shape[0], H0, W0), dtype=torch.bool)
    sf = _sf_tensor(scale_factor)
    if boxes.shape[0] > 0:
        rescaled = boxes * sf[None]
        valid = rescaled[:, -1] != 0
        mrois = torch.cat([rescaled.new_zeros((rescaled.shape[0], 1)), rescaled], dim=1)[valid]
        mask_pred = mask_forward_ref(model, feats, mrois)
        vlabels = labels[valid]
        probs = mask_pred.sigmoid()[torch.arange(mrois.shape[0]), vlabels]
        paste_boxes = rescaled[valid] / sf[None]
        soft = paste_masks_ref(probs, paste_boxes, H0, W0)
        masks[valid] = soft >= mask_thr
        inter.update(mask_rois=mrois, mask_valid=valid, mask_pred=mask_pred, mask_probs=probs,
                     paste_boxes=paste_boxes, mask_soft=soft)
    else:
        inter.update(mask_rois=boxes.new_zeros((0, 5)), mask_valid=torch.zeros((0,), dtype=torch.bool),
                     mask_pred=boxes.new_zeros((0, model.num_classes, 28, 28)), mask_probs=boxes.new_zeros((0, 28, 28)),
                     paste_boxes=boxes.new_zeros((0, 4)), mask_soft=boxes.new_zeros((0, H0, W0)))
    out = (boxes, scores, labels, masks)
    return out + (inter,) if return_intermediate else out
