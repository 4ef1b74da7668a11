"""PyTorch reference of the LIT RetinaNet detectors and of mmdet 2.11 / mmcv 1.3 RetinaNet post-processing.

Test reference only (parity spec sections 3, 4, 5, 6, 7). Everything here is plain torch, fp32, CPU.

Model: ``RetinaNetRef(backbone)`` = ``backbone.*`` (LITTiDet / LITSDet) + ``neck.*`` (FPN, start_level 1,
'on_input' extra convs, 5 outputs) + ``bbox_head.*`` (RetinaHead, 80 classes, A = 9).

Post-processing:

* ``anchors_ref``: mmdet ``AnchorGenerator`` (v2): base size = stride, centre offset 0 (anchors centred on the cell
  corner), ratio-outer/scale-inner base order ('scale_major'), flat order ``(y*W + x)*A + a``;
* ``delta2bbox_ref``: ``DeltaXYWHBBoxCoder.decode`` incl. the dw/dh clamp at ``|log(wh_ratio_clip)|`` and the clip
  to ``max_shape`` = (h, w);
* ``nms_ref`` / ``batched_nms_ref`` / ``multiclass_nms_ref``: mmcv/mmdet NMS with the CUDA kernel rule
  ``inter > thr * (A + B - inter)`` (fp32, no +1), boxes visited in descending score order (stable sort, so ties keep
  their input order; CUDA's sort is unstable on ties);
* ``retinanet_simple_test_ref``: ``RetinaNet.simple_test(rescale=True)`` for one image.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .fpn import FPN
from .lit_s import LITSDet
from .lit_ti import LITTiDet
from .retina_head import RetinaHead

__all__ = [
    "RETINANET_BACKBONES", "RETINA_STRIDES", "RetinaNetRef",
    "anchors_ref", "base_anchors_ref", "delta2bbox_ref", "bbox2delta_ref",
    "nms_ref", "batched_nms_ref", "multiclass_nms_ref", "retinanet_simple_test_ref",
]

# backbone name -> (class, the four backbone output channel counts C2..C5)
RETINANET_BACKBONES = {
    "lit_ti": (LITTiDet, (64, 128, 320, 512)),
    "lit_s": (LITSDet, (96, 192, 384, 768)),
}
RETINA_STRIDES = (8, 16, 32, 64, 128)
WH_RATIO_CLIP = 16 / 1000


def _backbone_name(name: str) -> str:
    n = name.lower().replace("-", "_")
    return {"ti": "lit_ti", "s": "lit_s"}.get(n, n)


class RetinaNetRef(nn.Module):
    """LIT RetinaNet: ``forward(img) -> (cls_scores, bbox_preds)`` (5 levels each, NCHW, strides 8..128)."""

    def __init__(self, backbone: str = "lit_ti", num_classes: int = 80):
        super().__init__()
        name = _backbone_name(backbone)
        if name not in RETINANET_BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; known: {sorted(RETINANET_BACKBONES)}")
        cls, chans = RETINANET_BACKBONES[name]
        self.backbone_name = name
        self.backbone = cls()
        self.neck = FPN(list(chans), 256, num_outs=5, start_level=1, add_extra_convs="on_input",
                        relu_before_extra_convs=False)
        self.bbox_head = RetinaHead(num_classes=num_classes, in_channels=256, feat_channels=256, stacked_convs=4,
                                    num_anchors=9)
        self.strides = RETINA_STRIDES

    def extract_feat(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.neck(self.backbone(img))

    def forward(self, img: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        return self.bbox_head(self.extract_feat(img))


# ----------------------------------------------------------------------------------------------------------------
# Anchors (mmdet AnchorGenerator, v2 semantics)
def base_anchors_ref(base_size: float, scales: torch.Tensor, ratios: torch.Tensor,
                     center_offset: float = 0.0) -> torch.Tensor:
    """(A, 4) float32 base anchors, index ``ratio_i * n_scales + scale_i`` (mmdet 'scale_major=True')."""
    w = h = base_size
    x_c = center_offset * w
    y_c = center_offset * h
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w * w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h * h_ratios[:, None] * scales[None, :]).view(-1)
    return torch.stack([x_c - 0.5 * ws, y_c - 0.5 * hs, x_c + 0.5 * ws, y_c + 0.5 * hs], dim=-1)


def anchors_ref(feat_sizes: Sequence[Tuple[int, int]], strides: Sequence[int] = RETINA_STRIDES,
                octave_base_scale: Optional[float] = 4, scales_per_octave: int = 3,
                ratios: Sequence[float] = (0.5, 1.0, 2.0), scales: Optional[Sequence[float]] = None,
                center_offset: float = 0.0, concat: bool = False) -> Union[List[torch.Tensor], torch.Tensor]:
    """Per-level anchors ``(H*W*A, 4)`` float32 for ``feat_sizes`` [(H, W), ...] (row ``(y*W + x)*A + a``).

    RetinaNet: the defaults (scales ``4 * 2**(k/3)``, ratios [0.5, 1, 2], strides 8..128).
    RPN: ``anchors_ref(sizes, (4, 8, 16, 32, 64), octave_base_scale=None, scales=(8,))``.
    ``concat=True`` returns the levels concatenated low to high.
    """
    if scales is None:
        octave_scales = np.array([2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
        scales_t = torch.Tensor(octave_scales * octave_base_scale)  # float64 numpy -> float32, as mmdet
    else:
        scales_t = torch.Tensor(list(scales))
    ratios_t = torch.Tensor(list(ratios))
    out = []
    for (fh, fw), stride in zip(feat_sizes, strides):
        base = base_anchors_ref(stride, scales_t, ratios_t, center_offset)
        shift_x = torch.arange(0, int(fw)) * stride
        shift_y = torch.arange(0, int(fh)) * stride
        xx = shift_x.repeat(len(shift_y))
        yy = shift_y.view(-1, 1).repeat(1, len(shift_x)).view(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).type_as(base)
        out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
    return torch.cat(out, 0) if concat else out


# ----------------------------------------------------------------------------------------------------------------
# DeltaXYWHBBoxCoder (mmdet 2.11)
def bbox2delta_ref(proposals: torch.Tensor, gt: torch.Tensor, means=(0.0, 0.0, 0.0, 0.0),
                   stds=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Encode (N, 4) gt boxes against (N, 4) proposals."""
    proposals = proposals.float()
    gt = gt.float()
    px = (proposals[..., 0] + proposals[..., 2]) * 0.5
    py = (proposals[..., 1] + proposals[..., 3]) * 0.5
    pw = proposals[..., 2] - proposals[..., 0]
    ph = proposals[..., 3] - proposals[..., 1]
    gx = (gt[..., 0] + gt[..., 2]) * 0.5
    gy = (gt[..., 1] + gt[..., 3]) * 0.5
    gw = gt[..., 2] - gt[..., 0]
    gh = gt[..., 3] - gt[..., 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    means = deltas.new_tensor(means).unsqueeze(0)
    stds = deltas.new_tensor(stds).unsqueeze(0)
    return deltas.sub_(means).div_(stds)


def delta2bbox_ref(anchors: torch.Tensor, deltas: torch.Tensor, means=(0.0, 0.0, 0.0, 0.0),
                   stds=(1.0, 1.0, 1.0, 1.0), max_shape: Optional[Sequence[int]] = None,
                   wh_ratio_clip: float = WH_RATIO_CLIP, clip_border: bool = True) -> torch.Tensor:
    """Decode ``deltas`` (N, 4k) against ``anchors`` (N, 4); ``max_shape`` = (h, w[, c]) clips x to [0, w] and
    y to [0, h]. dw/dh (after de-normalisation) are clamped to ``+-|log(wh_ratio_clip)|``; dx/dy are not."""
    means = deltas.new_tensor(means).view(1, -1).repeat(1, deltas.size(-1) // 4)
    stds = deltas.new_tensor(stds).view(1, -1).repeat(1, deltas.size(-1) // 4)
    d = deltas * stds + means
    dx, dy, dw, dh = d[..., 0::4], d[..., 1::4], d[..., 2::4], d[..., 3::4]
    max_ratio = float(np.abs(np.log(wh_ratio_clip)))
    dw = dw.clamp(min=-max_ratio, max=max_ratio)
    dh = dh.clamp(min=-max_ratio, max=max_ratio)
    px = ((anchors[..., 0] + anchors[..., 2]) * 0.5).unsqueeze(-1).expand_as(dx)
    py = ((anchors[..., 1] + anchors[..., 3]) * 0.5).unsqueeze(-1).expand_as(dy)
    pw = (anchors[..., 2] - anchors[..., 0]).unsqueeze(-1).expand_as(dw)
    ph = (anchors[..., 3] - anchors[..., 1]).unsqueeze(-1).expand_as(dh)
    gw = pw * dw.exp()
    gh = ph * dh.exp()
    gx = px + pw * dx
    gy = py + ph * dy
    x1 = gx - gw * 0.5
    y1 = gy - gh * 0.5
    x2 = gx + gw * 0.5
    y2 = gy + gh * 0.5
    if clip_border and max_shape is not None:
        H, W = float(max_shape[0]), float(max_shape[1])
        x1 = x1.clamp(min=0, max=W)
        y1 = y1.clamp(min=0, max=H)
        x2 = x2.clamp(min=0, max=W)
        y2 = y2.clamp(min=0, max=H)
    return torch.stack([x1, y1, x2, y2], dim=-1).view(deltas.size())


# ----------------------------------------------------------------------------------------------------------------
# NMS (mmcv 1.3 CUDA kernel rules)
def _suppress(box: torch.Tensor, others: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """mmcv ``devIoU`` (offset 0) in fp32: ``inter > thr * (Sa + Sb - inter)``."""
    left = torch.maximum(box[0], others[:, 0])
    right = torch.minimum(box[2], others[:, 2])
    top = torch.maximum(box[1], others[:, 1])
    bottom = torch.minimum(box[3], others[:, 3])
    zero = box.new_zeros(())
    w = torch.maximum(right - left, zero)
    h = torch.maximum(bottom - top, zero)
    inter = w * h
    sa = (box[2] - box[0]) * (box[3] - box[1])
    sb = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter > thr * (sa + sb - inter)


def nms_ref(boxes: torch.Tensor, scores: torch.Tensor, iou_thr: float) -> torch.Tensor:
    """Greedy NMS; returns the kept indices (int64) in descending score order.

    Boxes are visited in descending score order (stable: ties keep input order); a box suppresses every later box
    with ``inter > iou_thr * (area_a + area_b - inter)`` (strict, fp32, no +1)."""
    boxes = boxes.float()
    scores = scores.float()
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros((0,), dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    thr = torch.tensor(iou_thr, dtype=torch.float32)
    alive = torch.ones(n, dtype=torch.bool)
    keep = []
    for i in range(n):
        if not alive[i]:
            continue
        keep.append(i)
        if i + 1 < n:
            alive[i + 1:] &= ~_suppress(b[i], b[i + 1:], thr)
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms_ref(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_thr: float,
                    class_agnostic: bool = False, split_thr: int = 10000) -> Tuple[torch.Tensor, torch.Tensor]:
    """mmcv ``batched_nms``: returns ``(dets (K, 5) = [original box, score], keep (K,))`` sorted by score.

    Class-aware NMS via the offset trick: ``boxes + idx * (boxes.max() + 1)`` (fp32). With fewer than ``split_thr``
    candidates it is one NMS call; otherwise one NMS per class on the (still offset) boxes and a re-sort of the union
    by score (``argsort(descending=True)``, here stable)."""
    boxes = boxes.float()
    scores = scores.float()
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, 5)), torch.zeros((0,), dtype=torch.long)
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        max_coordinate = boxes.max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
        boxes_for_nms = boxes + offsets[:, None]
    if boxes_for_nms.shape[0] < split_thr:
        keep = nms_ref(boxes_for_nms, scores, iou_thr)
    else:
        total_mask = torch.zeros(scores.shape, dtype=torch.bool)
        for cid in torch.unique(idxs):
            mask = (idxs == cid).nonzero(as_tuple=False).view(-1)
            k = nms_ref(boxes_for_nms[mask], scores[mask], iou_thr)
            total_mask[mask[k]] = True
        keep = total_mask.nonzero(as_tuple=False).view(-1)
        keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
    dets = torch.cat([boxes[keep], scores[keep][:, None]], dim=-1)
    return dets, keep


def multiclass_nms_ref(boxes: torch.Tensor, scores: torch.Tensor, score_thr: float = 0.05, iou_thr: float = 0.5,
                       max_num: int = 100, return_inds: bool = False):
    """mmdet 2.11 ``multiclass_nms`` on FOREGROUND scores only.

    ``boxes``: (N, 4) shared by all classes, or (N, 4*C) class-specific; ``scores``: (N, C) without the background
    column (mmdet's input has one more, last, column that it drops). Every (row, class) pair with
    ``score > score_thr`` (strict) is a candidate, flattened row-major (row outer, class inner); class-aware
    ``batched_nms_ref``; the first ``max_num`` (``max_num <= 0``: all) by descending score.

    Returns ``(dets (K, 5), labels (K,))`` and, with ``return_inds``, also the kept flat indices ``row*C + class``.
    """
    scores = scores.float()
    n, c = scores.shape
    if boxes.shape[1] > 4:
        bboxes = boxes.float().view(n, -1, 4)
    else:
        bboxes = boxes.float()[:, None].expand(n, c, 4)
    labels = torch.arange(c, dtype=torch.long).view(1, -1).expand_as(scores)
    bboxes = bboxes.reshape(-1, 4)
    flat_scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    inds = (flat_scores > score_thr).nonzero(as_tuple=False).squeeze(1)
    bboxes, flat_scores, labels = bboxes[inds], flat_scores[inds], labels[inds]
    if inds.numel() == 0:
        out = (bboxes.new_zeros((0, 5)), labels)
        return out + (inds,) if return_inds else out
    dets, keep = batched_nms_ref(bboxes, flat_scores, labels, iou_thr)
    if max_num > 0:
        dets = dets[:max_num]
        keep = keep[:max_num]
    out = (dets, labels[keep])
    return out + (inds[keep],) if return_inds else out


# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def retinanet_simple_test_ref(model: RetinaNetRef, img: torch.Tensor, img_shape: Sequence[int],
                              scale_factor, nms_pre: int = 1000, score_thr: float = 0.05, iou_thr: float = 0.5,
                              max_num: int = 100, return_raw: bool = False):
    """mmdet 2.11 ``RetinaNet.simple_test(img, img_metas, rescale=True)`` for ONE image (spec section 7).

    ``img``: (1, 3, Hp, Wp) normalized, 32-padded; ``img_shape``: (h, w[, 3]) of the resized, unpadded image;
    ``scale_factor``: 4 values (w_s, h_s, w_s, h_s).

    Per level: sigmoid; if the level has more than ``nms_pre`` anchors keep the ``torch.topk(nms_pre)`` by max class
    score; decode (stds 1) and clip to img_shape. Concatenate levels, divide the boxes by scale_factor, then
    ``multiclass_nms_ref(score_thr, iou_thr, max_num)``.

    Returns ``(boxes (K, 4), scores (K,), labels (K,))`` in original-image coordinates (no clip after rescale);
    with ``return_raw`` also a dict with the per-image candidate ``boxes``/``scores`` given to the NMS.
    """
    assert img.shape[0] == 1, "one image"
    cls_scores, bbox_preds = model(img)
    num_classes = model.bbox_head.cls_out_channels
    sizes = [tuple(s.shape[-2:]) for s in cls_scores]
    mlvl_anchors = anchors_ref(sizes, model.strides[:len(sizes)])
    mlvl_boxes, mlvl_scores = [], []
    for cls_score, bbox_pred, anchors in zip(cls_scores, bbox_preds, mlvl_anchors):
        assert cls_score.shape[-2:] == bbox_pred.shape[-2:]
        scores = cls_score[0].permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
        deltas = bbox_pred[0].permute(1, 2, 0).reshape(-1, 4)
        if 0 < nms_pre < scores.shape[0]:
            max_scores, _ = scores.max(dim=1)
            _, topk_inds = max_scores.topk(nms_pre)
            anchors = anchors[topk_inds]
            deltas = deltas[topk_inds]
            scores = scores[topk_inds]
        mlvl_boxes.append(delta2bbox_ref(anchors, deltas, max_shape=img_shape))
        mlvl_scores.append(scores)
    boxes = torch.cat(mlvl_boxes, 0)
    sf = torch.as_tensor(np.asarray(scale_factor, dtype=np.float32)).view(1, 4)
    boxes = boxes / sf
    scores = torch.cat(mlvl_scores, 0)
    dets, labels = multiclass_nms_ref(boxes, scores, score_thr, iou_thr, max_num)
    out = (dets[:, :4], dets[:, 4], labels)
    if return_raw:
        return out + ({"boxes": boxes, "scores": scores},)
    return out
