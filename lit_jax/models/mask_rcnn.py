"""Mask R-CNN inference with mmdetection 2.11 semantics: LIT backbone -> FPN (P2-P6) -> RPN -> RoI heads.

``shared/parity_spec.md`` §8-§10, §14. Layout NHWC; boxes ``(x1, y1, x2, y2)``. Static shapes throughout:
``rpn_max_per_img`` proposal slots per image (invalid slots hold zero boxes), ``max_per_img`` detection slots
with a validity mask. :meth:`MaskRCNN.predict` is jit-able; the masks are pasted at the (static) original
image size by :meth:`MaskRCNN.paste` (one compilation per ``ori_shape``).

Variable paths follow the mmdet state_dict (``backbone.*``, ``neck.*``, ``rpn_head.*``,
``roi_head.bbox_head.*``, ``roi_head.mask_head.*``), so :func:`lit_jax.convert.mmdet.load_mmdet_pth` maps a
checkpoint by its generic rule.

``image_info`` for :meth:`MaskRCNN.predict`: ``img_shape`` ``(B, 2)`` (h, w) of the resized image (proposals
and boxes are clipped to it) and ``scale_factor`` ``(B, 4)`` (w_s, h_s, w_s, h_s).

Test path per image (mmdet ``TwoStageDetector.simple_test(rescale=True)``):

1. RPN: per level sigmoid, top ``rpn_nms_pre``, decode (stds 1), clip, NMS per level (0.7), top
   ``rpn_max_per_img`` (:func:`lit_jax.ops.proposals.rpn_proposals`);
2. RoIs ``[b, proposal]`` -> multilevel RoIAlign 7x7 (P2-P5) -> ``Shared2FCBBoxHead``;
   a RoI whose y2 is exactly 0 (mmdet's zero padding; also our empty proposal slots) gets zeroed logits
   and deltas, so its softmax is 1/81 and it never passes the score threshold;
   softmax; class-specific decode (stds 0.1, 0.1, 0.2, 0.2) clipped to img_shape; ``/ scale_factor``;
   ``multiclass_nms`` (> 0.05, IoU 0.5, 100) on the 80 foreground columns (background is the last);
3. masks: ``rescaled = det_boxes * scale_factor`` (mmdet's divide-then-multiply rounding is kept) ->
   RoIAlign 14x14 -> ``FCNMaskHead`` -> sigmoid -> label channel; pasted into ``rescaled / scale_factor``
   at ori_shape, ``>= 0.5``. Detections whose rescaled y2 is exactly 0 are dropped from the mask branch
   (``mask_valid`` False: an all-False mask), as mmdet 2.11.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.ops.anchors import AnchorConfig, multilevel_anchors, rpn_anchor_config
from lit_jax.ops.boxes import decode_deltas
from lit_jax.ops.mask_paste import paste_masks
from lit_jax.ops.nms import multiclass_nms
from lit_jax.ops.proposals import rpn_proposals
from lit_jax.ops.roi_align import multilevel_roi_align

__all__ = ["RoIHead", "MaskRCNNModule", "MaskRCNNConfig", "MaskRCNN", "RCNN_STDS"]

RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
ROI_STRIDES = (4, 8, 16, 32)


class RoIHead(nn.Module):
    """mmdet ``StandardRoIHead`` parameters: ``bbox_head`` (Shared2FCBBoxHead) and ``mask_head`` (FCNMaskHead).

    The RoI extractors have no parameters. ``__call__`` runs both heads (used to create the variables)."""

    bbox_head: nn.Module
    mask_head: nn.Module

    def __call__(self, bbox_feats, mask_feats):
        return self.bbox_head(bbox_feats), self.mask_head(mask_feats)


class MaskRCNNModule(nn.Module):
    """backbone -> neck -> rpn_head; ``roi_head`` holds the RoI heads (named as the mmdet state_dict).

    ``__call__(images)`` returns ``(feats, (rpn_logits, rpn_deltas))``; :meth:`bbox_forward` /
    :meth:`mask_forward` apply the RoI heads to pooled features (call them with ``method=``).
    """

    backbone: nn.Module
    neck: nn.Module
    rpn_head: nn.Module
    roi_head: nn.Module
    roi_channels: int = 256

    def __call__(self, images, train: bool = False):
        feats = self.neck(self.backbone(images, train=train))
        rpn_out = self.rpn_head(feats)
        if self.is_initializing():  # create the RoI heads' variables
            c = self.roi_channels
            self.roi_head(jnp.zeros((1, 7, 7, c), jnp.float32), jnp.zeros((1, 14, 14, c), jnp.float32))
        return feats, rpn_out

    def bbox_forward(self, roi_feats):
        """``(R, 7, 7, C)`` -> (cls ``(R, num_classes + 1)``, deltas ``(R, 4 * num_classes)``)."""
        return self.roi_head.bbox_head(roi_feats)

    def mask_forward(self, roi_feats):
        """``(R, 14, 14, C)`` -> logits ``(R, 28, 28, num_classes)``."""
        return self.roi_head.mask_head(roi_feats)


@dataclasses.dataclass(frozen=True)
class MaskRCNNConfig:
    """Test settings of the LIT Mask R-CNN configs (mmdet 2.11)."""

    num_classes: int = 80
    rpn_nms_pre: int = 1000
    rpn_max_per_img: int = 1000
    rpn_iou_thr: float = 0.7
    score_thr: float = 0.05
    iou_thr: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
    finest_scale: float = 56.0


class MaskRCNN:
    """A Mask R-CNN detector (inference): the Flax module plus anchors, proposals and post-processing.

    ``variables = det.init(key, (H, W))``; ``out = det.predict(variables, images, image_info)``;
    ``masks = det.paste(out['mask_probs'], out['mask_boxes'], ori_shape, out['mask_valid'])``.
    """

    def __init__(self, module: MaskRCNNModule, cfg: MaskRCNNConfig = MaskRCNNConfig(),
                 anchors: AnchorConfig = rpn_anchor_config()):
        self.module = module
        self.cfg = cfg
        self.anchor_cfg = anchors

    # -- model -------------------------------------------------------------------------------------------
    def init(self, key: jax.Array, image_hw: tuple[int, int] = (224, 224)) -> dict[str, Any]:
        images = jnp.zeros((1, image_hw[0], image_hw[1], 3), jnp.float32)
        return dict(self.module.init(key, images))

    def forward(self, variables, images):
        """Eval forward: ``(feats (5 NHWC maps), (rpn_logits list (B, N_l), rpn_deltas list (B, N_l, 4)))``."""
        return self.module.apply(variables, images, train=False)

    def anchors(self, canvas_hw: tuple[int, int]) -> list[np.ndarray]:
        a = self.anchor_cfg
        return multilevel_anchors(canvas_hw, a.strides, a.scales, a.ratios, a.base_sizes)

    def bbox_forward(self, variables, feats, rois):
        """RoIAlign 7x7 on P2-P5 + bbox head for rois ``(R, 5)`` ``[b, x1, y1, x2, y2]`` (no quirk)."""
        roi_feats = multilevel_roi_align(feats[:4], rois, 7, strides=ROI_STRIDES, finest_scale=self.cfg.finest_scale,
                                         sampling_ratio=0, aligned=True)
        return self.module.apply(variables, roi_feats, method=MaskRCNNModule.bbox_forward)

    def mask_forward(self, variables, feats, rois):
        """RoIAlign 14x14 on P2-P5 + mask head: logits ``(R, 28, 28, num_classes)``."""
        roi_feats = multilevel_roi_align(feats[:4], rois, 14, strides=ROI_STRIDES,
                                         finest_scale=self.cfg.finest_scale, sampling_ratio=0, aligned=True)
        return self.module.apply(variables, roi_feats, method=MaskRCNNModule.mask_forward)

    # -- stages ------------------------------------------------------------------------------------------
    def proposals(self, rpn_out, canvas_hw, img_shape):
        """Per-image RPN proposals: ``(boxes (B, P, 4), scores (B, P), valid (B, P))``, P = rpn_max_per_img."""
        cfg = self.cfg
        logits, deltas = rpn_out
        anchors = [jnp.asarray(a) for a in self.anchors(canvas_hw)]

        def one(lg, dl, shape):
            return rpn_proposals(lg, dl, anchors, shape, nms_pre=cfg.rpn_nms_pre, max_per_img=cfg.rpn_max_per_img,
                                 iou_thr=cfg.rpn_iou_thr)

        return jax.vmap(one)(list(logits), list(deltas), img_shape.astype(jnp.float32))

    def bbox_postprocess(self, rois, cls_score, bbox_pred, img_shape, scale_factor, valid=None):
        """mmdet ``get_bboxes(rescale=True)`` + ``multiclass_nms`` for ONE image; rois ``(R, 4)``.

        Returns (:class:`lit_jax.ops.nms.Detections`, flat pair indices ``row * C + class``)."""
        cfg = self.cfg
        pad = rois[:, 3] == 0  # the y2 == 0 quirk
        cls_score = jnp.where(pad[:, None], 0.0, cls_score)
        bbox_pred = jnp.where(pad[:, None], 0.0, bbox_pred)
        scores = jax.nn.softmax(cls_score, axis=-1)
        boxes = decode_deltas(rois, bbox_pred, stds=RCNN_STDS, max_shape=img_shape)  # (R, 4C)
        boxes = boxes / jnp.tile(scale_factor, cfg.num_classes)
        boxes = boxes.reshape(boxes.shape[0], cfg.num_classes, 4)
        return multiclass_nms(boxes, scores[:, :-1], score_thr=cfg.score_thr, iou_thr=cfg.iou_thr,
                              max_num=cfg.max_per_img, valid=valid, return_inds=True)

    # -- inference ---------------------------------------------------------------------------------------
    def predict(self, variables, images, image_info: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
        """Detections per image in original-image pixels.

        Returns a dict: ``boxes`` ``(B, K, 4)``, ``scores`` ``(B, K)``, ``labels`` ``(B, K)`` int32 (-1 empty),
        ``valid`` ``(B, K)``; ``mask_probs`` ``(B, K, 28, 28)`` sigmoid of the label channel; ``mask_boxes``
        ``(B, K, 4)`` = ``(boxes * sf) / sf``, where the masks are pasted; ``mask_valid`` ``(B, K)`` (valid and
        rescaled y2 != 0); ``proposals`` ``(B, P, 4)`` / ``proposal_scores`` / ``proposal_valid``.
        """
        img_shape = jnp.asarray(image_info["img_shape"], jnp.float32)
        scale_factor = jnp.asarray(image_info["scale_factor"], jnp.float32)
        feats, rpn_out = self.forward(variables, images)
        props, prop_scores, prop_valid = self.proposals(rpn_out, images.shape[1:3], img_shape)
        out = self.detect(variables, feats, props, prop_valid, img_shape, scale_factor)
        out.update(proposals=props, proposal_scores=prop_scores, proposal_valid=prop_valid)
        return out

    def detect(self, variables, feats, proposals, proposal_valid, img_shape, scale_factor) -> dict[str, jnp.ndarray]:
        """The RoI stage of :meth:`predict` from given proposals ``(B, P, 4)`` (``proposal_valid`` ``(B, P)``;
        invalid slots should hold zero boxes, as mmdet's padding). Returns :meth:`predict`'s dict without the
        proposal entries."""
        b, p = proposals.shape[:2]
        img_shape = jnp.asarray(img_shape, jnp.float32)
        scale_factor = jnp.asarray(scale_factor, jnp.float32)
        bidx = jnp.repeat(jnp.arange(b, dtype=jnp.float32), p)[:, None]
        rois = jnp.concatenate([bidx, proposals.reshape(b * p, 4)], axis=1)
        cls_score, bbox_pred = self.bbox_forward(variables, feats, rois)
        cls_score = cls_score.reshape(b, p, -1)
        bbox_pred = bbox_pred.reshape(b, p, -1)

        def post(r, c, d, shape, sf, v):
            det, _ = self.bbox_postprocess(r, c, d, shape, sf, v)
            return det

        dets = jax.vmap(post)(proposals, cls_score, bbox_pred, img_shape, scale_factor, proposal_valid)
        k = dets.boxes.shape[1]
        rescaled = dets.boxes * scale_factor[:, None, :]
        mask_valid = dets.valid & (rescaled[..., 3] != 0)
        kidx = jnp.repeat(jnp.arange(b, dtype=jnp.float32), k)[:, None]
        mrois = jnp.concatenate([kidx, rescaled.reshape(b * k, 4)], axis=1)
        mask_logits = self.mask_forward(variables, feats, mrois)  # (B*K, 28, 28, C)
        labels = jnp.maximum(dets.labels, 0).reshape(b * k)
        label_logits = jnp.take_along_axis(mask_logits, labels[:, None, None, None], axis=3)[..., 0]
        mask_probs = jax.nn.sigmoid(label_logits).reshape(b, k, *label_logits.shape[1:])
        mask_boxes = rescaled / scale_factor[:, None, :]
        return dict(boxes=dets.boxes, scores=dets.scores, labels=dets.labels, valid=dets.valid,
                    mask_probs=mask_probs, mask_boxes=mask_boxes, mask_valid=mask_valid)

    def paste(self, mask_probs, mask_boxes, ori_shape: Sequence[int], mask_valid=None) -> np.ndarray:
        """Bool masks ``(..., H0, W0)`` at the static original size (mmdet's GPU paste, ``>= mask_thr``).

        ``mask_probs`` ``(..., 28, 28)``, ``mask_boxes`` ``(..., 4)``; ``mask_valid`` ``(...)``: False rows
        (empty slots, rescaled y2 == 0) give all-False masks. Jitted per ``ori_shape``."""
        h0, w0 = int(ori_shape[0]), int(ori_shape[1])
        probs = jnp.asarray(mask_probs, jnp.float32)
        lead = probs.shape[:-2]
        flat = probs.reshape((-1,) + probs.shape[-2:])
        boxes = jnp.asarray(mask_boxes, jnp.float32).reshape(-1, 4)
        masks = paste_masks(flat, boxes, (h0, w0), self.cfg.mask_thr)
        if mask_valid is not None:
            masks = masks & jnp.asarray(mask_valid, bool).reshape(-1)[:, None, None]
        return np.asarray(masks).reshape(lead + (h0, w0))


def build_mask_rcnn(backbone: nn.Module, num_classes: int = 80, dtype=jnp.float32,
                    cfg: Optional[MaskRCNNConfig] = None) -> MaskRCNN:
    """The LIT Mask R-CNN: FPN(start_level 0, P6 = P5[::2, ::2]), RPNHead(3 anchors), Shared2FC + FCN heads."""
    from lit_jax.models.fpn import FPN
    from lit_jax.models.mask_rcnn_heads import FCNMaskHead, RPNHead, Shared2FCBBoxHead

    neck = FPN(out_channels=256, num_outs=5, start_level=0, add_extra_convs=None, dtype=dtype)
    roi_head = RoIHead(bbox_head=Shared2FCBBoxHead(num_classes=num_classes, dtype=dtype),
                       mask_head=FCNMaskHead(num_classes=num_classes, dtype=dtype))
    module = MaskRCNNModule(backbone=backbone, neck=neck, rpn_head=RPNHead(num_anchors=3, dtype=dtype),
                            roi_head=roi_head)
    return MaskRCNN(module, cfg or MaskRCNNConfig(num_classes=num_classes))
