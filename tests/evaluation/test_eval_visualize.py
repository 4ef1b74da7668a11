"""draw_detections / save_image: pixels change on the boxes only, score_thr, empty input, masks, file IO."""
import os

import cv2
import numpy as np
import pytest

from lit_jax.evaluation.visualize import class_color, draw_detections, save_image

H, W = 120, 160
NAMES = ["cat", "dog", "bird"]


def _image(value=0):
    return np.full((H, W, 3), value, np.uint8)


def test_draws_on_box_border_and_leaves_far_pixels():
    img = _image()
    before = img.copy()
    boxes = np.array([[40.0, 50.0, 100.0, 90.0]], np.float32)
    out = draw_detections(img, boxes, [0.9], [1], NAMES)
    np.testing.assert_array_equal(img, before)  # pure: the input is untouched
    assert out.dtype == np.uint8 and out.shape == img.shape and out is not img
    # the four borders are coloured with the class colour
    color = np.array(class_color(1), np.uint8)
    for y, x in [(70, 40), (70, 100), (90, 70), (50 + 1, 99)]:  # left, right, bottom, near top-right
        np.testing.assert_array_equal(out[y, x], color)
    # the box interior away from the label and far-away pixels are untouched
    np.testing.assert_array_equal(out[75:86, 50:90], before[75:86, 50:90])
    np.testing.assert_array_equal(out[:20, 120:], before[:20, 120:])
    np.testing.assert_array_equal(out[100:, :], before[100:, :])
    # something (the 'dog|0.90' label) is drawn above the box
    assert (out[30:50, 40:100] != 0).any()


def test_score_threshold_is_strict():
    img = _image(17)
    boxes = np.array([[10, 10, 50, 50], [60, 20, 120, 80]], np.float32)
    labels = np.array([0, 2])
    out = draw_detections(img, boxes, [0.2, 0.3], labels, NAMES, score_thr=0.3)
    np.testing.assert_array_equal(out, img)  # 0.2 < thr and 0.3 == thr: nothing drawn (mmdet: score > thr)
    out = draw_detections(img, boxes, [0.2, 0.31], labels, NAMES, score_thr=0.3)
    assert (out[20:81, 60] != 17).any()  # the second box's left edge
    np.testing.assert_array_equal(out[12:49, 10:12], img[12:49, 10:12])  # the first box stays undrawn
    assert not (out == draw_detections(img, boxes, [0.9, 0.9], labels, NAMES, score_thr=0.0)).all()


def test_zero_detections():
    img = _image(5)
    out = draw_detections(img, np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,), int), NAMES)
    np.testing.assert_array_equal(out, img)
    out = draw_detections(img, np.zeros((0, 4)), [], [], NAMES, masks=np.zeros((0, H, W), bool))
    np.testing.assert_array_equal(out, img)


def test_masks_and_class_colours():
    img = _image(100)
    masks = np.zeros((2, H, W), bool)
    masks[0, 60:80, 20:60] = True
    masks[1, 60:80, 90:130] = True
    boxes = np.array([[10, 50, 70, 90], [80, 50, 140, 90]], np.float32)
    out = draw_detections(img, boxes, [0.8, 0.7], [0, 1], NAMES, masks=masks, show_text=False)
    a, b = out[70, 40].astype(int), out[70, 110].astype(int)
    assert (a != 100).any() and (b != 100).any() and (a != b).any()  # blended, in different class colours
    np.testing.assert_array_equal(out[55:58, 20:60], img[55:58, 20:60])  # inside the box, outside the mask
    assert len({class_color(i) for i in range(80)}) == 80
    with pytest.raises(ValueError):
        draw_detections(img, boxes, [0.8, 0.7], [0, 1], NAMES, masks=masks[:1])


def test_out_of_image_and_unknown_class():
    img = _image()
    out = draw_detections(img, np.array([[-50, -40, 1e7, 1e9], [5, 5, 20, 20]]), [0.9, 0.9], [7, 0], None)
    assert out.shape == img.shape and (out != 0).any()
    with pytest.raises(ValueError):
        draw_detections(img.astype(np.float32), np.zeros((0, 4)), [], [], NAMES)


def test_save_image_roundtrip_and_errors(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    rgb[2, 3] = (1, 2, 3)
    p = save_image(tmp_path / "sub" / "vis.png", rgb)
    bgr = cv2.imread(p, cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(bgr[..., ::-1], rgb)
    with pytest.raises(OSError, match="cannot write image"):
        save_image(tmp_path / "vis.not_an_image_format", rgb)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write image"):
        save_image(os.path.join(str(blocker), "vis.png"), rgb)
