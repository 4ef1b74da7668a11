"""The library's single-image preprocessing equals the tf.data evaluation pipeline's output exactly (one code
path: both decode and resize with lit_jax.data.image), on a real photograph, in per-image and canvas modes."""

import cv2
import numpy as np
import pytest
import tensorflow as tf

from lit_jax.data import pipeline as P
from lit_jax.data.image import prepare_image
from lit_jax.inference import read_image


@pytest.mark.parametrize("canvas,scale", [(None, (1333, 800)), ((800, 1344), (1333, 800)), (None, (352, 256))])
def test_prepare_image_equals_the_eval_pipeline(tmp_path, canvas, scale):
    import skimage.data

    rgb = skimage.data.coffee()  # (400, 600, 3), a real photograph
    path = str(tmp_path / "coffee.jpg")
    cv2.imwrite(path, rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    with open(path, "rb") as f:
        data = f.read()
    cfg = P.DataConfig(img_scale=scale)
    record = {"image": tf.constant(data), "filename": tf.constant(path), "image_id": tf.constant(7, tf.int64)}
    want = {k: v.numpy() for k, v in P.eval_transform(record, canvas=canvas, cfg=cfg).items()}
    got = prepare_image(read_image(path), scale, canvas=canvas)
    np.testing.assert_array_equal(got.image, want["images"])
    np.testing.assert_array_equal(got.img_shape, want["img_shape"])
    np.testing.assert_array_equal(got.scale_factor, want["scale_factor"])
    np.testing.assert_array_equal(got.ori_shape, want["ori_shape"])
    assert got.image.shape[:2] == (canvas or tuple(want["pad_shape"]))


def test_prepare_image_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        prepare_image(np.zeros((5, 5), np.uint8), (1333, 800))
    with pytest.raises(ValueError, match="does not fit the canvas"):
        prepare_image(np.zeros((400, 600, 3), np.uint8), (1333, 800), canvas=(800, 800))
