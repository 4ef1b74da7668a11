"""RetinaNet with mmdetection 2.x semantics: LIT backbone -> FPN -> RetinaHead, loss and inference.

``shared/parity_spec.md`` §3-§7. Layout NHWC; boxes ``(x1, y1, x2, y2)`` in pixels of the resized (padded)
image. Everything is static-shape: ground truth padded to ``G`` with a validity mask, anchors fixed by the
canvas, detections returned in ``max_per_img`` slots with a validity mask.

Batch dict (from ``lit_jax.data``) used by :meth:`RetinaNet.loss`:
  images ``(B, H, W, 3)`` float32 normalised; gt_boxes ``(B, G, 4)``; gt_labels ``(B, G)`` int32 in
  ``[0, num_classes)``; gt_valid ``(B, G)`` bool; pad_shape ``(B, 2)`` (h, w) of each image's own 32-padded
  size (anchors beyond it are invalid, as the original's per-image valid flags).
``image_info`` for :meth:`RetinaNet.predict`: img_shape ``(B, 2)`` (h, w) of the resized image (boxes are
  clipped to it) and scale_factor ``(B, 4)`` (w_s, h_s, w_s, h_s) to map boxes back to the original image.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.models.fpn import ConvModule
from lit_jax.models.outputs import DetectorOutput
from lit_jax.ops.anchors import AnchorConfig, feature_sizes, multilevel_anchors, multilevel_valid_flags, retinanet_anchor_config
from lit_jax.ops.assign import max_iou_assign
from lit_jax.ops.boxes import decode_deltas, encode_deltas
from lit_jax.ops.losses import group_sums, l1_loss, sigmoid_focal_loss
from lit_jax.ops.nms import Detections, multiclass_nms

Dtype = Any

_normal_001 = nn.initializers.normal(stddev=0.01)


class RetinaHead(nn.Module):
    """mmdet ``RetinaHead``: 4 conv+ReLU per branch shared over levels, then 3x3 logits and deltas.

    Output channels are anchor-major as the original (``a * C + c`` and ``a * 4 + k``), so a map
    ``(B, H, W, A*C)`` reshapes to ``(B, H*W*A, C)`` in the anchor order ``(y*W + x)*A + a``.
    """

    num_classes: int = 80
    num_anchors: int = 9
    feat_channels: int = 256
    stacked_convs: int = 4
    dtype: Dtype = jnp.float32

    def setup(self):
        conv = dict(kernel_init=_normal_001, dtype=self.dtype)
        self.cls_convs = [ConvModule(self.feat_channels, 3, padding=1, relu=True, **conv)
                          for _ in range(self.stacked_convs)]
        self.reg_convs = [ConvModule(self.feat_channels, 3, padding=1, relu=True, **conv)
                          for _ in range(self.stacked_convs)]
        prior = -math.log((1 - 0.01) / 0.01)
        self.retina_cls = nn.Conv(self.num_anchors * self.num_classes, (3, 3), padding=((1, 1), (1, 1)),
                                  kernel_init=_normal_001, bias_init=nn.initializers.constant(prior),
                                  dtype=self.dtype)
        self.retina_reg = nn.Conv(self.num_anchors * 4, (3, 3), padding=((1, 1), (1, 1)),
                                  kernel_init=_normal_001, dtype=self.dtype)

    def __call__(self, feats):
        """feats: tuple of ``(B, H_l, W_l, C)`` -> (cls list ``(B, H_l*W_l*A, num_classes)``, reg list
        ``(B, H_l*W_l*A, 4)``), float32."""
        cls_out, reg_out = [], []
        for x in feats:
            c, r = x, x
            for layer in self.cls_convs:
                c = layer(c)
            for layer in self.reg_convs:
                r = layer(r)
            b = x.shape[0]
            cls_out.append(self.retina_cls(c).reshape(b, -1, self.num_classes).astype(jnp.float32))
            reg_out.append(self.retina_reg(r).reshape(b, -1, 4).astype(jnp.float32))
        return cls_out, reg_out


class RetinaNetModule(nn.Module):
    """backbone -> neck -> bbox_head, named as the mmdet state_dict (``backbone.*``, ``neck.*``, ``bbox_head.*``)."""

    backbone: nn.Module
    neck: nn.Module
    bbox_head: nn.Module

    def __call__(self, images, train: bool = False):
        feats = self.backbone(images, train=train)
        return self.bbox_head(self.neck(feats))


@dataclasses.dataclass(frozen=True)
class RetinaNetConfig:
    """Training and test settings of mmdet's RetinaNet configs (the LIT ones use the defaults)."""

    num_classes: int = 80
    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.4
    min_pos_iou: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_bbox_weight: float = 1.0
    # Images whose losses share one normaliser: the original normalises per GPU (2 images each) and DDP
    # averages the gradients, i.e. the mean over groups of per-group losses. None: the whole batch is one group.
    loss_group_size: Optional[int] = None
    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_thr: float = 0.5
    max_per_img: int = 100


class RetinaNet:
    """A RetinaNet detector: the Flax module plus anchors, targets, losses and post-processing.

    ``variables = det.init(key, (H, W))``; ``loss, aux = det.loss(variables, batch, rng)`` (train mode:
    returns ``aux['batch_stats']`` to carry on); ``dets = det.predict(variables, images, image_info)`` (a
    :class:`DetectorOutput` without masks).
    """

    with_masks = False
    # Flax parameter paths whose shapes depend on num_classes (re-initialised when fine-tuning on other classes).
    class_layers = ("bbox_head/retina_cls",)

    def num_classes_in_state_dict(self, state_dict) -> int:
        """The class count of an mmdet RetinaNet state_dict (``retina_cls`` has ``anchors * classes`` outputs)."""
        return int(state_dict["bbox_head.retina_cls.bias"].shape[0]) // self.num_anchors

    def __init__(self, module: RetinaNetModule, cfg: RetinaNetConfig = RetinaNetConfig(),
                 anchors: AnchorConfig = retinanet_anchor_config()):
        self.module = module
        self.cfg = cfg
        self.anchor_cfg = anchors
        self.num_anchors = len(anchors.scales) * len(anchors.ratios)

    # -- model -------------------------------------------------------------------------------------------
    def init(self, key: jax.Array, image_hw: tuple[int, int] = (224, 224)) -> dict[str, Any]:
        images = jnp.zeros((1, image_hw[0], image_hw[1], 3), jnp.float32)
        return dict(self.module.init(key, images))

    def forward(self, variables, images, *, train: bool = False, rng: Optional[jax.Array] = None):
        """Raw head outputs; in train mode also the updated ``batch_stats``."""
        if not train:
            return self.module.apply(variables, images, train=False), variables.get("batch_stats", {})
        rngs = {"dropout": rng} if rng is not None else {}
        outs, updates = self.module.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
        return outs, updates["batch_stats"]

    def anchors(self, canvas_hw: tuple[int, int]) -> list[np.ndarray]:
        """Per-level anchors ``(H_l*W_l*A, 4)`` for a padded canvas (numpy, constants under jit)."""
        a = self.anchor_cfg
        return multilevel_anchors(canvas_hw, a.strides, a.scales, a.ratios, a.base_sizes)

    # -- training ----------------------------------------------------------------------------------------
    # Batch keys :meth:`loss` reads.
    train_batch_keys = ("images", "gt_boxes", "gt_labels", "gt_valid", "pad_shape")

    def image_targets(self, anchors, anchor_valid, gt_boxes, gt_labels, gt_valid):
        """Targets for one image. anchors ``(N, 4)``, anchor_valid ``(N,)``, gt ``(G, ...)``.

        Returns (onehot ``(N, C)``, label_weight ``(N,)``, box_target ``(N, 4)``, pos ``(N,)``).
        """
        cfg = self.cfg
        res = max_iou_assign(anchors, gt_boxes, gt_valid, pos_iou_thr=cfg.pos_iou_thr, neg_iou_thr=cfg.neg_iou_thr,
                             min_pos_iou=cfg.min_pos_iou, anchor_valid=anchor_valid)
        pos = res.assigned_gt >= 0
        neg = res.assigned_gt == -1
        gt_idx = jnp.maximum(res.assigned_gt, 0)
        labels = jnp.where(pos, gt_labels[gt_idx], cfg.num_classes)
        onehot = jax.nn.one_hot(labels, cfg.num_classes + 1, dtype=jnp.float32)[:, : cfg.num_classes]
        matched = jnp.where(pos[:, None], gt_boxes[gt_idx], anchors)  # non-positives encode to 0
        box_target = encode_deltas(anchors, matched)
        return onehot, (pos | neg).astype(jnp.float32), box_target, pos

    def loss(self, variables, batch: Mapping[str, jnp.ndarray], rng: Optional[jax.Array] = None, *,
             train: bool = True):
        """Focal + L1 loss as mmdet's ``AnchorHead.loss`` for a batch; returns ``(total, aux)``.

        aux: ``{'loss_cls', 'loss_bbox', 'num_pos', 'batch_stats'}``. Both terms are divided by
        ``sum_img max(num_pos, 1)`` of each loss group (the original's per-GPU factor), then averaged over
        groups (the gradient average of DDP).
        """
        cfg = self.cfg
        images = batch["images"]
        b = images.shape[0]
        (cls_out, reg_out), batch_stats = self.forward(variables, images, train=train, rng=rng)
        canvas = images.shape[1:3]
        levels = self.anchors(canvas)
        anchors = jnp.asarray(np.concatenate(levels))
        feat_hws = feature_sizes(canvas, self.anchor_cfg.strides)

        def per_image(pad_hw, gt_boxes, gt_labels, gt_valid):
            valid = jnp.concatenate(multilevel_valid_flags(feat_hws, pad_hw, self.anchor_cfg.strides, self.num_anchors))
            return self.image_targets(anchors, valid, gt_boxes, gt_labels, gt_valid)

        onehot, label_w, box_t, pos = jax.vmap(per_image)(
            batch["pad_shape"], batch["gt_boxes"], batch["gt_labels"], batch["gt_valid"].astype(bool))
        logits = jnp.concatenate(cls_out, axis=1)  # (B, N, C)
        deltas = jnp.concatenate(reg_out, axis=1)  # (B, N, 4)
        cls_per_image = jnp.sum(
            sigmoid_focal_loss(logits, onehot, label_w[..., None], alpha=cfg.focal_alpha, gamma=cfg.focal_gamma),
            axis=(1, 2))
        reg_per_image = jnp.sum(jnp.where(pos[..., None], l1_loss(deltas, box_t), 0.0), axis=(1, 2))
        num_pos = jnp.sum(pos, axis=1)

        g = cfg.loss_group_size or b
        norm = group_sums(jnp.maximum(num_pos, 1), g).astype(jnp.float32)
        loss_cls = jnp.mean(group_sums(cls_per_image, g) / norm)
        loss_bbox = cfg.loss_bbox_weight * jnp.mean(group_sums(reg_per_image, g) / norm)
        total = loss_cls + loss_bbox
        aux = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "num_pos": jnp.sum(num_pos), "batch_stats": batch_stats}
        return total, aux

    # -- inference ---------------------------------------------------------------------------------------
    def postprocess(self, cls_out, reg_out, canvas_hw, img_shape, scale_factor) -> Detections:
        """mmdet ``get_bboxes`` + ``multiclass_nms`` for one image (level outputs without the batch axis)."""
        cfg = self.cfg
        boxes_all, scores_all = [], []
        for anchors, logits, deltas in zip(self.anchors(canvas_hw), cls_out, reg_out):
            scores = jax.nn.sigmoid(logits)
            anchors = jnp.asarray(anchors)
            if scores.shape[0] > cfg.nms_pre:
                _, idx = jax.lax.top_k(jnp.max(scores, axis=1), cfg.nms_pre)
                scores, deltas, anchors = scores[idx], deltas[idx], anchors[idx]
            boxes_all.append(decode_deltas(anchors, deltas, max_shape=img_shape))
            scores_all.append(scores)
        boxes = jnp.concatenate(boxes_all) / scale_factor
        scores = jnp.concatenate(scores_all)
        return multiclass_nms(boxes, scores, score_thr=cfg.score_thr, iou_thr=cfg.iou_thr, max_num=cfg.max_per_img)

    def predict(self, variables, images, image_info: Mapping[str, jnp.ndarray]) -> DetectorOutput:
        """Detections per image in original-image pixels: boxes ``(B, K, 4)``, scores, labels, valid ``(B, K)``
        (no mask fields)."""
        (cls_out, reg_out), _ = self.forward(variables, images, train=False)
        canvas = images.shape[1:3]

        def one(cls_i, reg_i, img_shape, scale_factor):
            return self.postprocess(cls_i, reg_i, canvas, img_shape, scale_factor)

        dets = jax.vmap(one)(cls_out, reg_out, jnp.asarray(image_info["img_shape"], jnp.float32),
                             jnp.asarray(image_info["scale_factor"], jnp.float32))
        return DetectorOutput(boxes=dets.boxes, scores=dets.scores, labels=dets.labels, valid=dets.valid)
