"""``lit_jax.inference``: released-layout checkpoints (random weights saved by the PyTorch reference), their
converted folders, paths and arrays all give the detections of ``jax.jit(model.predict)`` on the same
preprocessed input.

Tolerances: boxes within 1e-3 px, same labels, scores within 1e-5, masks equal (the same computation runs on
both sides, so these only catch a different preprocessing or a lost detection). The preprocessing itself is
checked against the tf.data evaluation pipeline's output on a real photograph (exactly equal).
"""

import json
import os

import cv2
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from lit_jax.convert.mmdet import convert_checkpoint, load_mmdet_pth
from lit_jax.convert.store import save_variables
from lit_jax.data.image import prepare_image
from lit_jax.evaluation.coco_classes import COCO_CATEGORY_IDS, COCO_CLASSES
from lit_jax.inference import InputError, WeightsError, load_detector
from third_party.lit_torch.save_detector import save_random_detector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {"retinanet_lit_ti": "retinanet_lit_ti_fpn_1x_coco.py", "mask_rcnn_lit_ti": "mask_rcnn_lit_ti_fpn_1x_coco.py"}
# chelsea (300x451) at this scale: resized to 234x352, padded to the parity tests' canvas (256, 352).
SMALL = ["--config.data.img_scale=(352, 256)"]


def photo():
    import skimage.data

    return np.ascontiguousarray(skimage.data.chelsea())  # (300, 451, 3) uint8 RGB, a real photograph


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def released(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    pth = str(tmp / f"{kind}.pth")
    save_random_detector(kind, pth, seed=3, cls_bias_shift=3.0)
    variables, _, info = convert_checkpoint(kind, pth)
    converted = save_variables(str(tmp / "converted"), variables, info)
    png = str(tmp / "chelsea.png")
    cv2.imwrite(png, photo()[..., ::-1])
    config = os.path.join(ROOT, "configs", CONFIGS[kind])
    return kind, config, pth, converted, png


def _assert_same(a, b):
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3, rtol=0)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5, rtol=0)
    if a.masks is None:
        assert b.masks is None
    else:
        np.testing.assert_array_equal(a.masks, b.masks)


def test_pth_folder_path_and_array_give_the_models_own_detections(released):
    kind, config, pth, converted, png = released
    det = load_detector(config, pth, overrides=SMALL)
    assert det.class_names == list(COCO_CLASSES) and det.category_ids == list(COCO_CATEGORY_IDS)
    (from_array,) = det(photo())
    from_path, again = det([png, png])
    assert det.compiles == 1  # one padded shape, three images, two calls

    # The reference: the model's own jitted predict on the test pipeline's output, weights read directly.
    model = det.model
    variables = load_mmdet_pth(pth, model)
    prep = prepare_image(photo(), (352, 256))
    assert prep.image.shape == (256, 352, 3)
    out = jax.jit(model.predict)(variables, jnp.asarray(prep.image[None]),
                                 {"img_shape": prep.img_shape[None], "scale_factor": prep.scale_factor[None]})
    n = int(np.sum(out.valid[0]))
    np.testing.assert_array_equal(from_array.labels, np.asarray(out.labels[0, :n]))
    np.testing.assert_allclose(from_array.boxes, np.asarray(out.boxes[0, :n]), atol=1e-3, rtol=0)
    np.testing.assert_allclose(from_array.scores, np.asarray(out.scores[0, :n]), atol=1e-5, rtol=0)
    if model.with_masks:
        want = model.paste(out.mask_probs[0, :n], out.mask_boxes[0, :n], (300, 451), out.mask_valid[0, :n])
        np.testing.assert_array_equal(from_array.masks, want)
        assert from_array.masks.shape == (n, 300, 451) and from_array.masks.any()
    else:
        assert from_array.masks is None
    _assert_same(from_array, from_path)  # PNG is lossless: the file decodes to the same pixels
    _assert_same(from_path, again)
    assert list(from_array.names) == [COCO_CLASSES[i] for i in from_array.labels]

    # The converted folder carries the same weights and the class names.
    from lit_jax.inference import load_weights

    folder = load_weights(converted, model)
    assert folder.class_names == list(COCO_CLASSES) and folder.category_ids == list(COCO_CATEGORY_IDS)
    jax.tree.map(np.testing.assert_array_equal, folder.variables, variables)

    # COCO results: xywh boxes, COCO category ids, RLEs of the masks.
    entries = from_array.to_coco(139)
    assert len(entries) == len(from_array)
    by_score = sorted(entries, key=lambda e: -e["score"])[0]
    top = int(np.argmax(from_array.scores))
    x1, y1, x2, y2 = from_array.boxes[top].tolist()
    np.testing.assert_allclose(by_score["bbox"], [x1, y1, x2 - x1, y2 - y1], rtol=1e-6)
    assert by_score["category_id"] == COCO_CATEGORY_IDS[from_array.labels[top]]
    if model.with_masks:
        from pycocotools import mask as mask_util

        np.testing.assert_array_equal(mask_util.decode(by_score["segmentation"]).astype(bool), from_array.masks[top])


def test_class_count_mismatch_is_a_named_error(released, tmp_path):
    kind, config, pth, converted, png = released
    with pytest.raises(WeightsError, match="3 classes but model.num_classes is 80"):
        load_detector(config, pth, overrides=SMALL, class_names=["a", "b", "c"])
    info = json.load(open(os.path.join(converted, "conversion.json")))
    info["class_names"] = info["class_names"][:5]
    json.dump(info, open(os.path.join(converted, "conversion.json"), "w"))
    with pytest.raises(WeightsError, match=r"converted is trained on 5 classes but model.num_classes is 80"):
        load_detector(config, converted, overrides=SMALL)
    info["class_names"] = list(COCO_CLASSES)
    json.dump(info, open(os.path.join(converted, "conversion.json"), "w"))
    # Weights of another architecture: every differing key is listed.
    other = "configs/retinanet_lit_s_fpn_1x_coco.py" if kind.startswith("retinanet") else \
        "configs/mask_rcnn_lit_s_fpn_1x_coco.py"
    with pytest.raises(ValueError, match="wrong shape"):
        load_detector(os.path.join(ROOT, other), converted)


@pytest.mark.parametrize("released", ["retinanet_lit_ti"], indirect=True)  # input handling is detector-independent
def test_bad_inputs_are_named_and_the_others_still_run(released, tmp_path):
    kind, config, pth, converted, png = released
    det = load_detector(config, converted, overrides=SMALL)
    assert det.class_names == list(COCO_CLASSES)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = str(tmp_path / "missing.png")
    got = list(det.stream([missing, png, str(broken), str(empty), np.zeros((4, 4), np.uint8), png]))
    names = [n for n, _ in got]
    assert names == [missing, png, str(broken), str(empty), "array[4]", png]
    kinds = [type(r).__name__ for _, r in got]
    assert kinds == ["InputError", "Result", "InputError", "InputError", "InputError", "Result"]
    messages = [str(r) for _, r in got if isinstance(r, InputError)]
    assert "does not exist" in messages[0] and str(broken) in messages[1] and "does not decode" in messages[1]
    assert "holds no images" in messages[2] and "(H, W, 3) uint8" in messages[3]
    with pytest.raises(InputError, match="does not exist"):
        det([png, missing])
