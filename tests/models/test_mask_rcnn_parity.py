"""Mask R-CNN (LIT-Ti and LIT-S) inference parity against the PyTorch reference of mmdet 2.11's ``simple_test``.

A random-weight mmdet-layout checkpoint (``save_random_detector('mask_rcnn_lit_ti' | 'mask_rcnn_lit_s', ...)``,
every test runs for both backbones) is converted by the
generic rule and run on a non-square 32-padded canvas with ``img_shape < pad shape`` and ``w_s != h_s``.

Stages and tolerances:

* FPN maps and RPN head outputs: max |diff| <= 1e-4 x max |reference|;
* the top-1000 proposals of :meth:`MaskRCNN.predict` (full pipeline): same count, boxes within 1e-3 px and scores
  within 1e-5, slot by slot in score order;
* bbox head (7x7 RoIAlign + Shared2FC) and mask head (14x14 RoIAlign + FCN) on the SAME RoIs as the reference:
  1e-4 x max |reference|;
* detections and masks: the reference's RoI stage loops over RoIs in Python (~45 ms per box RoI, ~140 ms per mask
  RoI on 2 cores), so the reference end-to-end RoI stage runs on the top ``N_ROI`` reference proposals plus one
  RoI with y2 == 0 (the quirk), fed to :meth:`MaskRCNN.detect` (with padded empty slots): boxes within 1e-3 px,
  labels equal, scores within 1e-5, mask probabilities within 1e-4, pasted masks IoU >= 0.99 per detection;
* the full :meth:`MaskRCNN.predict` detections (all 1000 proposals) are checked against the reference's
  post-processing (``rcnn_get_bboxes_ref``: quirk, softmax, decode, rescale, multiclass NMS) applied to the
  reference proposals and our bbox head outputs for them (the head itself is checked above).
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from lit_jax.convert.mmdet import load_mmdet_pth
from lit_jax.models.mask_rcnn import MaskRCNN, build_mask_rcnn
from lit_jax.models.registry import build_backbone
from third_party.lit_torch.mask_rcnn import (mask_rcnn_simple_test_ref, rcnn_get_bboxes_ref, rpn_proposals_ref)
from third_party.lit_torch.save_detector import save_random_detector

RTOL = 1e-4
CANVAS = (256, 352)  # padded (h, w)
IMG_SHAPE = (240, 323)  # resized image inside the canvas
SCALE = np.array([0.85, 0.8, 0.85, 0.8], np.float32)  # (w_s, h_s, w_s, h_s)
ORI_SHAPE = (300, 380)
N_ROI = 120  # reference proposals for the end-to-end RoI-stage comparison
N_PAD = 7  # empty proposal slots appended on our side
QUIRK_ROW = 10  # where the y2 == 0 RoI is inserted
QUIRK_BOX = [20.0, 0.0, 60.0, 0.0]


def _rel(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: {got.shape} != {want.shape}"
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= RTOL * scale, f"{what}: {err:.3g} > {RTOL} x {scale:.3g}"
    return err / scale


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", params=["lit_ti", "lit_s"])
def setup(tmp_path_factory, request):
    backbone = request.param
    path = tmp_path_factory.mktemp("mask_rcnn") / f"mask_rcnn_{backbone}.pth"
    ref = save_random_detector(f"mask_rcnn_{backbone}", str(path), seed=5)
    det = build_mask_rcnn(build_backbone(backbone), num_classes=80)
    variables = load_mmdet_pth(path, det)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, CANVAS[0], CANVAS[1], 3)).astype(np.float32)
    image[:, IMG_SHAPE[0]:] = 0.0  # zero padding after normalisation
    image[:, :, IMG_SHAPE[1]:] = 0.0
    x = torch.from_numpy(image).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats_ref = ref.extract_feat(x)
        props_ref, rpn_raw = rpn_proposals_ref(ref, feats_ref, IMG_SHAPE, return_raw=True)
        sub = torch.cat([props_ref[:QUIRK_ROW, :4], torch.tensor([QUIRK_BOX]), props_ref[QUIRK_ROW:N_ROI, :4]])
        roi_ref = mask_rcnn_simple_test_ref(ref, x, IMG_SHAPE, SCALE, ORI_SHAPE, proposals=sub,
                                            return_intermediate=True)
    info = {"img_shape": jnp.asarray([IMG_SHAPE]), "scale_factor": jnp.asarray(SCALE[None])}
    images = jnp.asarray(image)
    feats, rpn_out = jax.jit(det.forward)(variables, images)
    out = jax.jit(det.predict)(variables, images, info)
    return dict(ref=ref, det=det, variables=variables, images=images, info=info, feats_ref=feats_ref,
                props_ref=props_ref, rpn_raw=rpn_raw, sub=sub, roi_ref=roi_ref, feats=feats, rpn_out=rpn_out,
                out=out)


def test_variables_match_checkpoint_keys(setup):
    params = setup["variables"]["params"]
    assert set(params) == {"backbone", "neck", "rpn_head", "roi_head"}
    assert set(params["roi_head"]) == {"bbox_head", "mask_head"}
    assert params["roi_head"]["bbox_head"]["shared_fcs_0"]["kernel"].shape == (256 * 7 * 7, 1024)
    assert params["roi_head"]["mask_head"]["upsample"]["kernel"].shape == (2, 2, 256, 256)


def test_fpn_and_rpn_outputs_match(setup):
    s = setup
    for lvl, (a, b) in enumerate(zip(s["feats"], s["feats_ref"])):
        _rel(a, _nhwc(b), f"P{lvl + 2}")
    logits, deltas = s["rpn_out"]
    for lvl, (lg, dl, c, r) in enumerate(zip(logits, deltas, s["rpn_raw"]["cls_scores"], s["rpn_raw"]["bbox_preds"])):
        _rel(lg, _nhwc(c).reshape(1, -1), f"rpn_cls level {lvl}")
        _rel(dl, _nhwc(r).reshape(1, -1, 4), f"rpn_reg level {lvl}")


def test_top1000_proposals_match(setup):
    out, want = setup["out"], setup["props_ref"].numpy()
    n = int(out.proposal_valid[0].sum())
    assert n == len(want) == 1000, "the canvas should give more than 1000 proposals so the cut is exercised"
    scores, boxes = np.asarray(out.proposal_scores[0]), np.asarray(out.proposals[0])
    np.testing.assert_allclose(scores, want[:, 4], atol=1e-5, rtol=0)
    # Slot by slot, except that proposals whose scores tie within 1e-5 may come in either order (round-off
    # decides; see lit_jax.ops.proposals on ties): such a slot must hold a reference box of a tied score.
    swapped = np.flatnonzero(np.abs(boxes - want[:, :4]).max(1) > 1e-3)
    for i in swapped:
        tied = np.flatnonzero(np.abs(want[:, 4] - scores[i]) <= 1e-5)
        assert np.abs(want[tied, :4] - boxes[i]).max(1).min() <= 1e-3, f"proposal {i} has no reference match"
    assert len(swapped) <= 10, f"{len(swapped)} proposals out of order (ties should be rare)"


def test_roi_heads_on_reference_rois(setup):
    s = setup
    det, v, r = s["det"], s["variables"], s["roi_ref"][4]
    rois = jnp.asarray(r["rois"].numpy())
    cls, reg = jax.jit(det.bbox_forward)(v, s["feats"], rois)
    _rel(cls, r["cls_score"].numpy(), "bbox head cls")
    _rel(reg, r["bbox_pred"].numpy(), "bbox head reg")
    mrois = jnp.asarray(r["mask_rois"].numpy())
    assert mrois.shape[0] > 0
    logits = jax.jit(det.mask_forward)(v, s["feats"], mrois)
    _rel(logits, _nhwc(r["mask_pred"]), "mask head logits")


def _mask_ious(a, b):
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def test_roi_stage_detections_and_masks(setup):
    s = setup
    det, v, r = s["det"], s["variables"], s["roi_ref"]
    boxes_ref, scores_ref, labels_ref, masks_ref, inter = r
    props = np.concatenate([s["sub"].numpy(), np.zeros((N_PAD, 4), np.float32)])[None]
    valid = np.arange(props.shape[1])[None] < s["sub"].shape[0]
    info = s["info"]
    out = jax.jit(det.detect)(v, s["feats"], jnp.asarray(props), jnp.asarray(valid), info["img_shape"],
                              info["scale_factor"])
    n = int(out.valid[0].sum())
    assert n == len(scores_ref) > 0
    np.testing.assert_array_equal(np.asarray(out.labels[0, :n]), labels_ref.numpy())
    np.testing.assert_allclose(np.asarray(out.scores[0, :n]), scores_ref.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.boxes[0, :n]), boxes_ref.numpy(), atol=1e-3, rtol=0)
    # The quirk RoI never fires (its softmax is 1/81); the reference shows it is a scored row.
    assert float(inter["scores"][QUIRK_ROW, :-1].max()) == pytest.approx(1 / 81, rel=1e-6)
    mv = np.asarray(out.mask_valid[0, :n])
    np.testing.assert_array_equal(mv, inter["mask_valid"].numpy())
    np.testing.assert_allclose(np.asarray(out.mask_probs[0, :n])[mv], inter["mask_probs"].numpy(),
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.mask_boxes[0, :n])[mv], inter["paste_boxes"].numpy(),
                               atol=1e-3, rtol=0)
    masks = det.paste(out.mask_probs[0, :n], out.mask_boxes[0, :n], ORI_SHAPE, out.mask_valid[0, :n])
    assert masks.shape == (n, *ORI_SHAPE) and masks.dtype == bool
    ious = _mask_ious(masks, masks_ref.numpy())
    assert ious.min() >= 0.99, f"mask IoU {ious.min():.4f} (detection {int(ious.argmin())})"
    assert masks_ref.numpy().any(axis=(1, 2)).sum() > n // 2, "most reference masks should be non-empty"


def test_full_predict_detections(setup):
    s = setup
    det, v, out = s["det"], s["variables"], s["out"]
    props = s["props_ref"]
    rois = torch.cat([props.new_zeros((len(props), 1)), props[:, :4]], dim=1)
    cls, reg = jax.jit(det.bbox_forward)(v, s["feats"], jnp.asarray(rois.numpy()))
    dets_ref, labels_ref = rcnn_get_bboxes_ref(rois, torch.from_numpy(np.array(cls)),
                                               torch.from_numpy(np.array(reg)), IMG_SHAPE, SCALE)
    n = int(out.valid[0].sum())
    assert n == len(labels_ref) == 100, "the random heads should give more than 100 candidates"
    np.testing.assert_array_equal(np.asarray(out.labels[0, :n]), labels_ref.numpy())
    np.testing.assert_allclose(np.asarray(out.scores[0, :n]), dets_ref[:, 4].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.boxes[0, :n]), dets_ref[:, :4].numpy(), atol=1e-3, rtol=0)
    # Boxes are in original pixels: within img_shape / scale_factor (no clip after the rescale).
    assert float(out.boxes[0, :n, 2].max()) <= IMG_SHAPE[1] / SCALE[0] + 1e-3
    assert float(out.boxes[0, :n, 3].max()) <= IMG_SHAPE[0] / SCALE[1] + 1e-3
    probs = np.asarray(out.mask_probs[0, :n])
    assert probs.shape == (n, 28, 28) and np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(np.asarray(out.mask_boxes[0, :n]),
                               (dets_ref[:, :4] * torch.from_numpy(SCALE)).numpy() / SCALE, atol=1e-3, rtol=0)


def test_paste_drops_invalid_masks(setup):
    det: MaskRCNN = setup["det"]
    probs = np.ones((2, 28, 28), np.float32)
    boxes = np.array([[10.0, 10.0, 50.0, 40.0], [10.0, 10.0, 50.0, 40.0]], np.float32)
    masks = det.paste(probs, boxes, (60, 70), np.array([True, False]))
    assert masks[0].any() and not masks[1].any()
    assert masks[0, 15, 20] and not masks[0, 45, 20]
