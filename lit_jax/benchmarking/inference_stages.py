"""The inference path split into separately jitted stages, and the image preprocessing it starts from.

The stages compute exactly what ``detector.predict`` computes (same functions, same order), each jitted on its
own and ended by ``block_until_ready``, so that the time of each can be read off. The whole ``jit(predict)`` is
measured apart: stage times add XLA launch and host syncs between stages, and lose cross-stage fusion.

Nothing here imports tensorflow, ml_collections or pycocotools (the image path imports cv2 only).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def preprocess_bytes(data: bytes, img_scale: Sequence[int], size_divisor: int = 32, name: str = "?"):
    """The test pipeline (:func:`lit_jax.data.image.prepare_image`) on encoded image bytes, decoded as mmcv.

    Returns ``(images (1, Hp, Wp, 3) float32, img_shape (1, 2) int32, scale_factor (1, 4) float32, (h0, w0))``.
    """
    import cv2

    from lit_jax.data.image import decode_bgr, prepare_image

    prepared = prepare_image(cv2.cvtColor(decode_bgr(data, name), cv2.COLOR_BGR2RGB), tuple(img_scale),
                             size_divisor=size_divisor)
    return (prepared.image[None], prepared.img_shape[None], prepared.scale_factor[None],
            tuple(int(v) for v in prepared.ori_shape))


class StagedInference:
    """``run(variables, images, img_shape, scale_factor, ori_hw)`` -> (host results dict, {stage: seconds})."""

    def __init__(self, stages: list[tuple[str, Callable]], finish: Callable):
        self.stages = stages  # (name, fn(state dict) -> state dict); fns are jitted where they run on device
        self.finish = finish  # state -> host results

    def run(self, variables, images, img_shape, scale_factor, ori_hw):
        state = dict(variables=variables, images=images, img_shape=jnp.asarray(img_shape, jnp.float32),
                     scale_factor=jnp.asarray(scale_factor, jnp.float32), ori_hw=tuple(ori_hw))
        times = {}
        for name, fn in self.stages:
            t0 = time.perf_counter()
            state = fn(state)
            jax.block_until_ready({k: v for k, v in state.items() if k != "ori_hw"})
            times[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self.finish(state)
        times["results to host"] = time.perf_counter() - t0
        return out, times


def _apply_sub(det, fn):
    """Applies ``fn(module, *args)`` to the detector's Flax module (its submodules are bound inside)."""
    def run(variables, *args):
        return det.module.apply(variables, *args, method=fn)
    return run


def staged_inference(det) -> StagedInference:
    """The stages of ``det.predict`` for a :class:`~lit_jax.models.mask_rcnn.MaskRCNN` or a RetinaNet."""
    backbone = jax.jit(_apply_sub(det, lambda m, x: m.backbone(x, train=False)))
    neck = jax.jit(_apply_sub(det, lambda m, f: m.neck(f)))

    def s_backbone(s):
        return dict(s, feats=backbone(s["variables"], s["images"]))

    def s_neck(s):
        return dict(s, feats=neck(s["variables"], s["feats"]))

    if hasattr(det, "detect"):  # Mask R-CNN
        return _mask_rcnn_stages(det, s_backbone, s_neck)
    return _retinanet_stages(det, s_backbone, s_neck)


def _retinanet_stages(det, s_backbone, s_neck) -> StagedInference:
    head = jax.jit(_apply_sub(det, lambda m, f: m.bbox_head(f)))

    @jax.jit
    def post(cls_out, reg_out, img_shape, scale_factor, canvas_like):
        canvas = canvas_like.shape[1:3]
        return jax.vmap(lambda c, r, i, sf: det.postprocess(c, r, canvas, i, sf))(cls_out, reg_out, img_shape,
                                                                                scale_factor)

    def s_head(s):
        return dict(s, head=head(s["variables"], s["feats"]))

    def s_post(s):
        cls_out, reg_out = s["head"]
        return dict(s, dets=post(cls_out, reg_out, s["img_shape"], s["scale_factor"], s["images"]))

    def finish(s):
        d = s["dets"]
        return {k: np.asarray(getattr(d, k)) for k in ("boxes", "scores", "labels", "valid")}

    return StagedInference([("backbone", s_backbone), ("FPN", s_neck), ("dense head", s_head),
                            ("NMS", s_post)], finish)


def _mask_rcnn_stages(det, s_backbone, s_neck) -> StagedInference:
    rpn_head = jax.jit(_apply_sub(det, lambda m, f: m.rpn_head(f)))

    @jax.jit
    def proposals(rpn_out, images, img_shape):
        return det.proposals(rpn_out, images.shape[1:3], img_shape)

    @jax.jit
    def box_head(variables, feats, props):
        b, p = props.shape[:2]
        bidx = jnp.repeat(jnp.arange(b, dtype=jnp.float32), p)[:, None]
        rois = jnp.concatenate([bidx, props.reshape(b * p, 4)], axis=1)
        cls_score, bbox_pred = det.bbox_forward(variables, feats, rois)
        return cls_score.reshape(b, p, -1), bbox_pred.reshape(b, p, -1)

    @jax.jit
    def nms(props, cls_score, bbox_pred, img_shape, scale_factor, prop_valid):
        post = lambda r, c, d, i, sf, v: det.bbox_postprocess(r, c, d, i, sf, v)[0]
        return jax.vmap(post)(props, cls_score, bbox_pred, img_shape, scale_factor, prop_valid)

    @jax.jit
    def mask_head(variables, feats, dets, scale_factor):
        b, k = dets.boxes.shape[:2]
        rescaled = dets.boxes * scale_factor[:, None, :]
        mask_valid = dets.valid & (rescaled[..., 3] != 0)
        kidx = jnp.repeat(jnp.arange(b, dtype=jnp.float32), k)[:, None]
        mrois = jnp.concatenate([kidx, rescaled.reshape(b * k, 4)], axis=1)
        logits = det.mask_forward(variables, feats, mrois)
        labels = jnp.maximum(dets.labels, 0).reshape(b * k)
        label_logits = jnp.take_along_axis(logits, labels[:, None, None, None], axis=3)[..., 0]
        probs = jax.nn.sigmoid(label_logits).reshape(b, k, *label_logits.shape[1:])
        return probs, rescaled / scale_factor[:, None, :], mask_valid

    def s_rpn(s):
        rpn_out = rpn_head(s["variables"], s["feats"])
        props, scores, valid = proposals(rpn_out, s["images"], s["img_shape"])
        return dict(s, props=props, prop_valid=valid)

    def s_box(s):
        return dict(s, box=box_head(s["variables"], s["feats"][:4], s["props"]))

    def s_nms(s):
        return dict(s, dets=nms(s["props"], *s["box"], s["img_shape"], s["scale_factor"], s["prop_valid"]))

    def s_mask(s):
        return dict(s, masks=mask_head(s["variables"], s["feats"][:4], s["dets"], s["scale_factor"]))

    def s_paste(s):
        probs, boxes, valid = s["masks"]
        return dict(s, pasted=det.paste(probs[0], boxes[0], s["ori_hw"], valid[0]))

    def finish(s):
        d = s["dets"]
        out = {k: np.asarray(getattr(d, k))[0] for k in ("boxes", "scores", "labels", "valid")}
        out["masks"] = s["pasted"]
        return out

    return StagedInference([("backbone", s_backbone), ("FPN", s_neck), ("RPN + proposals", s_rpn),
                            ("RoI box head", s_box), ("NMS", s_nms), ("RoI mask head", s_mask),
                            ("mask paste", s_paste)], finish)
