"""Mask R-CNN with mmdetection 2.11 semantics: LIT backbone -> FPN (P2-P6) -> RPN -> RoI heads.

``shared/parity_spec.md`` §8-§10, §14. Layout NHWC; boxes ``(x1, y1, x2, y2)``. Static shapes throughout:
``rpn_max_per_img`` proposal slots per image (invalid slots hold zero boxes), ``max_per_img`` detection slots
with a validity mask. :meth:`MaskRCNN.predict` is jit-able; the masks are pasted at the (static) original
image size by :meth:`MaskRCNN.paste` (one compilation per ``ori_shape``). :meth:`MaskRCNN.loss` is the training
path (targets in :mod:`lit_jax.models.mask_rcnn_targets`, mask targets resampled from the pipeline's GT crops).

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

from lit_jax.models.mask_rcnn_targets import rpn_targets, sample_rois
from lit_jax.models.outputs import DetectorOutput
from lit_jax.ops.anchors import AnchorConfig, feature_sizes, multilevel_anchors, multilevel_valid_flags, rpn_anchor_config
from lit_jax.ops.boxes import decode_deltas
from lit_jax.ops.losses import binary_cross_entropy_with_logits, group_sums, l1_loss, softmax_cross_entropy
from lit_jax.ops.mask_paste import paste_masks
from lit_jax.ops.mask_targets import batched_mask_targets_from_crops
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
    """Train and test settings of the LIT Mask R-CNN configs (mmdet 2.11 ``mask_rcnn_r50_fpn``)."""

    num_classes: int = 80
    # test
    rpn_nms_pre: int = 1000
    rpn_max_per_img: int = 1000
    rpn_iou_thr: float = 0.7
    score_thr: float = 0.05
    iou_thr: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
    finest_scale: float = 56.0
    # Static cap on RoIAlign's adaptive samples per bin axis (sampling_ratio 0). Inference: 16, exact for every
    # RoI whose adaptive grid fits (elongated boxes need more than the library default of 8 / 4); the loop
    # skips grid steps no RoI of the batch needs, so a large cap costs nothing unless used. Training: None = the
    # library default (roi_align module docstring), which bounds the backward's cost and memory.
    roi_max_samples_test: Optional[int] = 16
    roi_max_samples_train: Optional[int] = None
    # RoIAlign's gradient (training): 'compact' scatters only the samples each RoI uses; 'rows' (the earlier one)
    # every RoI in each step of the batch's largest sample grid. Same values up to addition order.
    roi_align_backward: str = "compact"
    # train: RPN targets (MaxIoU + RandomSampler) and the proposals handed to the RoI head
    rpn_pos_iou_thr: float = 0.7
    rpn_neg_iou_thr: float = 0.3
    rpn_min_pos_iou: float = 0.3
    rpn_num_samples: int = 256
    rpn_pos_fraction: float = 0.5
    rpn_train_nms_pre: int = 2000
    rpn_train_max_per_img: int = 1000
    # train: RoI head (MaxIoU 0.5 + RandomSampler with the gts added as proposals)
    rcnn_pos_iou_thr: float = 0.5
    rcnn_neg_iou_thr: float = 0.5
    rcnn_min_pos_iou: float = 0.5
    rcnn_num_samples: int = 512
    rcnn_pos_fraction: float = 0.25
    # The batch's ``gt_masks`` crops hold {0, 1} (1.0) or round(255 v) (1 / 255; data.mask_binary=False).
    gt_mask_scale: float = 1.0
    # Images sharing one loss normaliser (the original's 2 per GPU); None: the whole batch.
    loss_group_size: Optional[int] = None


class MaskRCNN:
    """A Mask R-CNN detector (inference): the Flax module plus anchors, proposals and post-processing.

    ``variables = det.init(key, (H, W))``; ``out = det.predict(variables, images, image_info)`` (a
    :class:`DetectorOutput` with masks); ``masks = det.paste(out.mask_probs[i], out.mask_boxes[i], ori_shape,
    out.mask_valid[i])``.
    """

    with_masks = True
    # Flax parameter paths whose shapes depend on num_classes (re-initialised when fine-tuning on other classes).
    class_layers = ("roi_head/bbox_head/fc_cls", "roi_head/bbox_head/fc_reg", "roi_head/mask_head/conv_logits")

    @staticmethod
    def num_classes_in_state_dict(state_dict) -> int:
        """The class count of an mmdet Mask R-CNN state_dict (``fc_cls`` has ``classes + 1`` outputs)."""
        return int(state_dict["roi_head.bbox_head.fc_cls.bias"].shape[0]) - 1

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

    def train_forward(self, variables, images, rng: Optional[jax.Array] = None):
        """Train-mode forward (BatchNorm batch statistics, drop path): ``(forward's outputs, batch_stats)``."""
        rngs = {"dropout": rng} if rng is not None else {}
        outs, updates = self.module.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
        return outs, updates["batch_stats"]

    def anchors(self, canvas_hw: tuple[int, int]) -> list[np.ndarray]:
        a = self.anchor_cfg
        return multilevel_anchors(canvas_hw, a.strides, a.scales, a.ratios, a.base_sizes)

    def bbox_forward(self, variables, feats, rois, *, train: bool = False):
        """RoIAlign 7x7 on P2-P5 + bbox head for rois ``(R, 5)`` ``[b, x1, y1, x2, y2]`` (no quirk)."""
        roi_feats = self._roi_features(feats, rois, 7, train)
        return self.module.apply(variables, roi_feats, method=MaskRCNNModule.bbox_forward)

    def mask_forward(self, variables, feats, rois, *, train: bool = False):
        """RoIAlign 14x14 on P2-P5 + mask head: logits ``(R, 28, 28, num_classes)``."""
        roi_feats = self._roi_features(feats, rois, 14, train)
        return self.module.apply(variables, roi_feats, method=MaskRCNNModule.mask_forward)

    def _roi_features(self, feats, rois, out: int, train: bool):
        cap = self.cfg.roi_max_samples_train if train else self.cfg.roi_max_samples_test
        return multilevel_roi_align(feats[:4], rois, out, strides=ROI_STRIDES, finest_scale=self.cfg.finest_scale,
                                    sampling_ratio=0, aligned=True, max_samples=cap,
                                    backward=self.cfg.roi_align_backward)

    # -- stages ------------------------------------------------------------------------------------------
    def proposals(self, rpn_out, canvas_hw, img_shape, *, nms_pre: Optional[int] = None,
                  max_per_img: Optional[int] = None):
        """Per-image RPN proposals: ``(boxes (B, P, 4), scores (B, P), valid (B, P))``, P = ``max_per_img``.

        Defaults: the test settings (``rpn_nms_pre``, ``rpn_max_per_img``); training passes its own."""
        cfg = self.cfg
        logits, deltas = rpn_out
        anchors = [jnp.asarray(a) for a in self.anchors(canvas_hw)]
        nms_pre = cfg.rpn_nms_pre if nms_pre is None else nms_pre
        max_per_img = cfg.rpn_max_per_img if max_per_img is None else max_per_img

        def one(lg, dl, shape):
            return rpn_proposals(lg, dl, anchors, shape, nms_pre=nms_pre, max_per_img=max_per_img,
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

    # -- training ----------------------------------------------------------------------------------------
    # Batch keys :meth:`loss` reads (``gt_masks``: the pipeline's per-GT crops, ``data.with_masks=True``).
    train_batch_keys = ("images", "gt_boxes", "gt_labels", "gt_valid", "gt_masks", "img_shape", "pad_shape")

    def loss(self, variables, batch: Mapping[str, jnp.ndarray], rng: Optional[jax.Array] = None, *,
             train: bool = True):
        """mmdet ``TwoStageDetector.forward_train`` losses for a batch; returns ``(total, aux)``.

        ``batch``: ``images`` ``(B, H, W, 3)``; ``gt_boxes`` ``(B, G, 4)``, ``gt_labels`` ``(B, G)``,
        ``gt_valid`` ``(B, G)``; ``gt_masks`` ``(B, G, m, m)`` crops of each GT mask over its own box;
        ``img_shape`` / ``pad_shape`` ``(B, 2)`` (h, w).

        Terms (each normalised per loss group of ``loss_group_size`` images, the original's per-GPU factors,
        then averaged over groups = DDP's gradient average):

        * ``loss_rpn_cls`` / ``loss_rpn_bbox``: BCE on the 256 sampled anchors and L1 on the positives' deltas,
          both over ``sum max(#pos, 1) + sum max(#neg, 1)``;
        * ``loss_cls``: CE over the sampled RoIs (background = ``num_classes``) / #RoIs;
        * ``loss_bbox``: L1 on the gt class's deltas of positive RoIs / #RoIs;
        * ``loss_mask``: BCE of the gt class's 28x28 logits against the targets resampled from ``gt_masks``
          (:func:`lit_jax.ops.mask_targets.batched_mask_targets_from_crops`), mean over #positives x 784.

        aux: the five terms, ``num_pos`` (positive RoIs), ``num_rpn_pos``, ``batch_stats``.
        """
        images = batch["images"]
        rng = jax.random.PRNGKey(0) if rng is None else rng
        k_drop, k_rpn, k_roi = jax.random.split(rng, 3)
        if train:
            (feats, (rpn_logits, rpn_deltas)), batch_stats = self.train_forward(variables, images, k_drop)
        else:
            feats, (rpn_logits, rpn_deltas) = self.forward(variables, images)
            batch_stats = variables.get("batch_stats", {})
        canvas = images.shape[1:3]
        t = self.rpn_train_targets(k_rpn, canvas, batch)
        loss_rpn_cls, loss_rpn_bbox = self.rpn_losses(rpn_logits, rpn_deltas, t)
        props, prop_valid = self.train_proposals(rpn_logits, rpn_deltas, canvas, batch["img_shape"])
        s = self.sample_train_rois(k_roi, props, prop_valid, batch)
        cls_score, bbox_pred = self.bbox_forward(variables, feats, self.bbox_train_rois(s), train=True)
        targets = self.mask_train_targets(batch, s)
        mask_logits = self.mask_forward(variables, feats, self.mask_train_rois(s), train=True)
        loss_cls, loss_bbox, loss_mask = self.rcnn_losses(cls_score, bbox_pred, mask_logits, s, targets)
        terms = {"loss_rpn_cls": loss_rpn_cls, "loss_rpn_bbox": loss_rpn_bbox, "loss_cls": loss_cls,
                 "loss_bbox": loss_bbox, "loss_mask": loss_mask}
        total = sum(terms.values())
        aux = dict(terms, num_pos=jnp.sum(s.num_pos), num_rpn_pos=jnp.sum(t.num_pos), batch_stats=batch_stats)
        return total, aux

    # The stages of :meth:`loss`, in its order (``lit_jax.benchmarking.staged_train`` jits each on its own).
    def _group(self, b: int) -> int:
        return self.cfg.loss_group_size or b

    def rpn_train_targets(self, key, canvas_hw, batch):
        """RPN anchor assignment (MaxIoU) + sampling per image: batched :class:`RPNTargets`."""
        cfg = self.cfg
        b = batch["gt_boxes"].shape[0]
        anchors = jnp.asarray(np.concatenate(self.anchors(canvas_hw)))
        feat_hws = feature_sizes(canvas_hw, self.anchor_cfg.strides)
        num_base = self.anchor_cfg.num_base_anchors

        def rpn_one(key, pad_hw, boxes, valid):
            anchor_valid = jnp.concatenate(multilevel_valid_flags(feat_hws, pad_hw, self.anchor_cfg.strides, num_base))
            return rpn_targets(key, anchors, anchor_valid, boxes, valid, pos_iou_thr=cfg.rpn_pos_iou_thr,
                               neg_iou_thr=cfg.rpn_neg_iou_thr, min_pos_iou=cfg.rpn_min_pos_iou,
                               num=cfg.rpn_num_samples, pos_fraction=cfg.rpn_pos_fraction)

        return jax.vmap(rpn_one)(jax.random.split(key, b), batch["pad_shape"], batch["gt_boxes"].astype(jnp.float32),
                                 batch["gt_valid"].astype(bool))

    def rpn_losses(self, rpn_logits, rpn_deltas, t):
        """``(loss_rpn_cls, loss_rpn_bbox)`` on the sampled anchors (normalised per loss group)."""
        b = t.indices.shape[0]
        per_group = lambda x: group_sums(x, self._group(b))  # noqa: E731  (B, ...) -> (B / g,)
        logits = jnp.take_along_axis(jnp.concatenate(rpn_logits, axis=1), t.indices, axis=1)  # (B, S)
        deltas = jnp.take_along_axis(jnp.concatenate(rpn_deltas, axis=1), t.indices[..., None], axis=1)
        rpn_cls = jnp.where(t.valid, binary_cross_entropy_with_logits(logits, t.is_pos), 0.0)
        rpn_reg = jnp.where(t.is_pos[..., None], l1_loss(deltas, t.deltas), 0.0)
        rpn_norm = per_group(jnp.maximum(t.num_pos, 1)) + per_group(jnp.maximum(t.num_neg, 1))
        return jnp.mean(per_group(rpn_cls) / rpn_norm), jnp.mean(per_group(rpn_reg) / rpn_norm)

    def train_proposals(self, rpn_logits, rpn_deltas, canvas_hw, img_shape):
        """Training proposals (no gradient): ``(boxes (B, P, 4), valid (B, P))``."""
        cfg = self.cfg
        props, _, prop_valid = self.proposals(
            (jax.lax.stop_gradient(rpn_logits), jax.lax.stop_gradient(rpn_deltas)), canvas_hw,
            img_shape.astype(jnp.float32), nms_pre=cfg.rpn_train_nms_pre, max_per_img=cfg.rpn_train_max_per_img)
        return props, prop_valid

    def sample_train_rois(self, key, props, prop_valid, batch):
        """RoI assignment + sampling with the gts added as candidates: batched :class:`RoISample`."""
        cfg = self.cfg
        b = props.shape[0]

        def roi_one(key, p, pv, boxes, labels, valid):
            return sample_rois(key, p, pv, boxes, labels, valid, num_classes=cfg.num_classes,
                               pos_iou_thr=cfg.rcnn_pos_iou_thr, neg_iou_thr=cfg.rcnn_neg_iou_thr,
                               min_pos_iou=cfg.rcnn_min_pos_iou, num=cfg.rcnn_num_samples,
                               pos_fraction=cfg.rcnn_pos_fraction, target_stds=RCNN_STDS)

        return jax.vmap(roi_one)(jax.random.split(key, b), props, prop_valid, batch["gt_boxes"].astype(jnp.float32),
                                 batch["gt_labels"].astype(jnp.int32), batch["gt_valid"].astype(bool))

    @staticmethod
    def bbox_train_rois(s):
        """The sampled RoIs as ``(B * S, 5)`` ``[b, x1, y1, x2, y2]`` (detached)."""
        b, n = s.rois.shape[:2]
        bidx = jnp.repeat(jnp.arange(b, dtype=jnp.float32), n)[:, None]
        return jnp.concatenate([bidx, jax.lax.stop_gradient(s.rois).reshape(b * n, 4)], axis=1)

    def _num_mask_rois(self) -> int:
        # The positive slots: the first int(num * pos_fraction) slots hold every positive.
        return int(self.cfg.rcnn_num_samples * self.cfg.rcnn_pos_fraction)

    def mask_train_rois(self, s):
        """The mask branch's RoIs, ``(B * M, 5)``: the first ``M`` sampled slots of each image."""
        b, m = s.rois.shape[0], self._num_mask_rois()
        mrois_img = jax.lax.stop_gradient(s.rois[:, :m])
        midx = jnp.repeat(jnp.arange(b, dtype=jnp.float32), m)[:, None]
        return jnp.concatenate([midx, mrois_img.reshape(b * m, 4)], 1)

    def mask_train_targets(self, batch, s):
        """28x28 mask targets of the mask RoIs, ``(B, M, 28, 28)``, resampled from the batch's GT crops."""
        m = self._num_mask_rois()
        mrois_img = jax.lax.stop_gradient(s.rois[:, :m])
        return batched_mask_targets_from_crops(batch["gt_masks"], batch["gt_boxes"].astype(jnp.float32), mrois_img,
                                               s.gt_index[:, :m], batch["pad_shape"], out_size=28,
                                               crop_scale=self.cfg.gt_mask_scale)

    def rcnn_losses(self, cls_score, bbox_pred, mask_logits, s, targets):
        """``(loss_cls, loss_bbox, loss_mask)`` from the RoI heads' outputs and the sample's targets."""
        cfg = self.cfg
        b, n = s.rois.shape[:2]
        m = self._num_mask_rois()
        per_group = lambda x: group_sums(x, self._group(b))  # noqa: E731
        ce = jnp.where(s.valid, softmax_cross_entropy(cls_score.reshape(b, n, -1), s.labels), 0.0)
        pred = bbox_pred.reshape(b, n, cfg.num_classes, 4)
        label_pred = jnp.take_along_axis(pred, jnp.minimum(s.labels, cfg.num_classes - 1)[..., None, None],
                                         axis=2)[:, :, 0]
        reg = jnp.where(s.is_pos[..., None], l1_loss(label_pred, s.deltas), 0.0)
        num_rois = jnp.maximum(per_group(s.valid), 1).astype(jnp.float32)
        loss_cls = jnp.mean(per_group(ce) / num_rois)
        loss_bbox = jnp.mean(per_group(reg) / num_rois)

        mpos = s.is_pos[:, :m]
        labels = jnp.minimum(s.labels[:, :m], cfg.num_classes - 1).reshape(b * m)
        label_logits = jnp.take_along_axis(mask_logits, labels[:, None, None, None], axis=3)[..., 0]
        bce = binary_cross_entropy_with_logits(label_logits.reshape(b, m, 28, 28), targets)
        bce = jnp.where(mpos[..., None, None], bce, 0.0)
        mask_norm = jnp.maximum(per_group(mpos) * 28 * 28, 1).astype(jnp.float32)
        loss_mask = jnp.mean(per_group(bce) / mask_norm)
        return loss_cls, loss_bbox, loss_mask

    # -- inference ---------------------------------------------------------------------------------------
    def predict(self, variables, images, image_info: Mapping[str, jnp.ndarray]) -> DetectorOutput:
        """Detections per image in original-image pixels.

        Returns a :class:`DetectorOutput`: ``boxes`` ``(B, K, 4)``, ``scores`` ``(B, K)``, ``labels`` ``(B, K)`` int32 (-1 empty),
        ``valid`` ``(B, K)``; ``mask_probs`` ``(B, K, 28, 28)`` sigmoid of the label channel; ``mask_boxes``
        ``(B, K, 4)`` = ``(boxes * sf) / sf``, where the masks are pasted; ``mask_valid`` ``(B, K)`` (valid and
        rescaled y2 != 0); ``proposals`` ``(B, P, 4)`` / ``proposal_scores`` / ``proposal_valid``.
        """
        img_shape = jnp.asarray(image_info["img_shape"], jnp.float32)
        scale_factor = jnp.asarray(image_info["scale_factor"], jnp.float32)
        feats, rpn_out = self.forward(variables, images)
        props, prop_scores, prop_valid = self.proposals(rpn_out, images.shape[1:3], img_shape)
        out = self.detect(variables, feats, props, prop_valid, img_shape, scale_factor)
        return out.replace(proposals=props, proposal_scores=prop_scores, proposal_valid=prop_valid)

    def detect(self, variables, feats, proposals, proposal_valid, img_shape, scale_factor) -> DetectorOutput:
        """The RoI stage of :meth:`predict` from given proposals ``(B, P, 4)`` (``proposal_valid`` ``(B, P)``;
        invalid slots should hold zero boxes, as mmdet's padding). Returns :meth:`predict`'s output without the
        proposal fields."""
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
        return DetectorOutput(boxes=dets.boxes, scores=dets.scores, labels=dets.labels, valid=dets.valid,
                              mask_probs=mask_probs, mask_boxes=mask_boxes, mask_valid=mask_valid)

    def paste(self, mask_probs, mask_boxes, ori_shape: Sequence[int], mask_valid=None, *,
              bucket: int = 1) -> np.ndarray:
        """Bool masks ``(..., H0, W0)`` at the original size (mmdet's GPU paste, ``>= mask_thr``).

        ``mask_probs`` ``(..., 28, 28)``, ``mask_boxes`` ``(..., 4)``; ``mask_valid`` ``(...)``: False rows
        (empty slots, rescaled y2 == 0) give all-False masks. The paste is jitted per canvas shape; with
        ``bucket > 1`` the canvas is ``ori_shape`` rounded up to a multiple of ``bucket`` and cropped back, which
        gives the same masks (each pixel depends only on its own coordinates and the box) with far fewer
        compilations over a dataset of many image sizes."""
        h0, w0 = int(ori_shape[0]), int(ori_shape[1])
        ch, cw = -(-h0 // bucket) * bucket, -(-w0 // bucket) * bucket
        probs = jnp.asarray(mask_probs, jnp.float32)
        lead = probs.shape[:-2]
        flat = probs.reshape((-1,) + probs.shape[-2:])
        boxes = jnp.asarray(mask_boxes, jnp.float32).reshape(-1, 4)
        masks = paste_masks(flat, boxes, (ch, cw), self.cfg.mask_thr)
        if mask_valid is not None:
            masks = masks & jnp.asarray(mask_valid, bool).reshape(-1)[:, None, None]
        return np.asarray(masks)[:, :h0, :w0].reshape(lead + (h0, w0))


def build_mask_rcnn(backbone: nn.Module, num_classes: int = 80, dtype=jnp.float32,
                    cfg: Optional[MaskRCNNConfig] = None, *, fpn_channels: int = 256, fc_out_channels: int = 1024,
                    mask_conv_channels: int = 256) -> MaskRCNN:
    """The LIT Mask R-CNN: FPN(start_level 0, P6 = P5[::2, ::2]), RPNHead(3 anchors), Shared2FC + FCN heads.

    The widths default to the original's; smaller ones are for CPU-sized experiments only."""
    from lit_jax.models.fpn import FPN
    from lit_jax.models.mask_rcnn_heads import FCNMaskHead, RPNHead, Shared2FCBBoxHead

    neck = FPN(out_channels=fpn_channels, num_outs=5, start_level=0, add_extra_convs=None, dtype=dtype)
    roi_head = RoIHead(bbox_head=Shared2FCBBoxHead(num_classes=num_classes, fc_out_channels=fc_out_channels,
                                                   dtype=dtype),
                       mask_head=FCNMaskHead(num_classes=num_classes, conv_out_channels=mask_conv_channels,
                                             dtype=dtype))
    module = MaskRCNNModule(backbone=backbone, neck=neck,
                            rpn_head=RPNHead(num_anchors=3, feat_channels=fpn_channels, dtype=dtype),
                            roi_head=roi_head, roi_channels=fpn_channels)
    return MaskRCNN(module, cfg or MaskRCNNConfig(num_classes=num_classes))
