"""Resize / flip / normalize / pad / mask ops against the spec's numbers and cv2 / pycocotools."""
import cv2
import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils

from lit_jax.data import coco_builder
from lit_jax.data import pipeline as P
from lit_jax.data import transforms as T

# (w, h) -> (new_w, new_h), (pad_w, pad_h) at scale (1333, 800); worked by hand with
# s = min(1333/max(w,h), 800/min(w,h)), new = int(x*s + 0.5), pad = ceil32.
HAND_CASES = [
    ((640, 480), (1067, 800), (1088, 800)),   # s = 1.6667: 1066.67 -> 1067
    ((640, 427), (1199, 800), (1216, 800)),   # s = 1.8735: 1199.06 -> 1199
    ((640, 360), (1333, 750), (1344, 768)),   # s = 2.0828 (long side binds): 749.8 -> 750
    ((480, 640), (800, 1067), (800, 1088)),   # portrait
    ((333, 517), (800, 1242), (800, 1248)),   # odd, portrait: s = 800/333; 517*s = 1242.04
    ((37, 29), (1021, 800), (1024, 800)),     # tiny: s = 800/29; 37*s = 1020.69
    ((2000, 100), (1333, 67), (1344, 96)),    # extreme: s = 0.6665; 100*s = 66.65
    ((1, 1), (800, 800), (800, 800)),
]


@pytest.mark.parametrize("wh,new,pad", HAND_CASES)
def test_data_rescale_size_hand_cases(wh, new, pad):
    assert T.rescale_size(*wh, (1333, 800)) == new
    nh, nw = T.rescale_size_tf(tf.constant(wh[1]), tf.constant(wh[0]), (1333, 800))
    assert (int(nw), int(nh)) == new
    assert (T.ceil_to(new[0], 32), T.ceil_to(new[1], 32)) == pad


def test_data_rescale_size_tf_matches_python_everywhere():
    rng = np.random.default_rng(0)
    ws, hs = rng.integers(1, 4000, 3000), rng.integers(1, 4000, 3000)
    for scale in [(1333, 800), (512, 320), (800, 1333)]:
        nh, nw = T.rescale_size_tf(tf.constant(hs), tf.constant(ws), scale)
        ref = np.array([T.rescale_size(int(w), int(h), scale) for w, h in zip(ws, hs)])
        np.testing.assert_array_equal(nw.numpy(), ref[:, 0])
        np.testing.assert_array_equal(nh.numpy(), ref[:, 1])


def _jpeg(w, h, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 2)
    return img, cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


@pytest.mark.parametrize("wh,new,pad", HAND_CASES)
def test_data_eval_transform_shapes_and_values(wh, new, pad):
    """Through the graph: img_shape, pad_shape, scale_factor, canvas, and pixels equal to mmdet's chain."""
    img_bgr, data = _jpeg(*wh)
    cfg = P.DataConfig()
    canvas = (800, 1344) if wh[0] / wh[1] > 1 else (1344, 800)
    e = {"image": tf.constant(data), "filename": tf.constant("x.jpg"), "image_id": tf.constant(7, tf.int64)}
    out = P.eval_transform(e, canvas=canvas, cfg=cfg)
    assert tuple(out["img_shape"].numpy()) == (new[1], new[0])
    assert tuple(out["pad_shape"].numpy()) == (pad[1], pad[0])
    assert tuple(out["ori_shape"].numpy()) == (wh[1], wh[0])
    sf = out["scale_factor"].numpy()
    np.testing.assert_array_equal(sf, np.array([new[0] / wh[0], new[1] / wh[1]] * 2, np.float32))
    assert out["images"].shape == canvas + (3,)
    # mmdet: cv2 decode (BGR), imrescale bilinear on uint8, imnormalize (to_rgb), pad with 0 after.
    dec = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    res = cv2.resize(dec, new, interpolation=cv2.INTER_LINEAR)
    ref = cv2.cvtColor(res.astype(np.float32), cv2.COLOR_BGR2RGB)
    ref = (ref - np.float32(T.MEAN_RGB)) * (1 / np.float64(T.STD_RGB)).astype(np.float32)
    got = out["images"].numpy()
    np.testing.assert_array_equal(got[:new[1], :new[0]], ref)
    assert not got[new[1]:].any() and not got[:, new[0]:].any()


def test_data_flip_boxes_hand_case():
    # 640x480 -> 1067x800, w_s = 1067/640, h_s = 800/480.
    sf = T.scale_factor_tf(480, 640, 800, 1067)
    boxes = T.resize_boxes(tf.constant([[10.0, 20.0, 110.0, 220.0], [600.0, 0.0, 700.0, 500.0]]), sf, 800, 1067)
    w_s, h_s = np.float32(1067 / 640), np.float32(800 / 480)
    exp = np.array([[10 * w_s, 20 * h_s, 110 * w_s, 220 * h_s],
                    [600 * w_s, 0, 1067, 800]], np.float32)  # clipped to the resized image
    np.testing.assert_array_equal(boxes.numpy(), exp)
    f = T.flip_boxes(boxes, 1067).numpy()
    np.testing.assert_array_equal(f[:, 0], np.float32(1067) - exp[:, 2])
    np.testing.assert_array_equal(f[:, 2], np.float32(1067) - exp[:, 0])
    np.testing.assert_array_equal(f[:, [1, 3]], exp[:, [1, 3]])
    np.testing.assert_array_equal(f[1], np.array([0, 0, 1067 - 600 * w_s, 800], np.float32))


def test_data_normalize_pad():
    img = tf.constant(np.array([[[0, 0, 0], [255, 128, 7]]], np.uint8))
    out = T.pad_to(T.normalize(img), 2, 4).numpy()
    assert out.shape == (2, 4, 3)
    np.testing.assert_allclose(out[0, 1], (np.array([255, 128, 7]) - T.MEAN_RGB) / T.STD_RGB, rtol=1e-6)
    assert not out[1].any() and not out[:, 2:].any()  # zero in normalised space


def test_data_default_canvases_and_buckets():
    assert P.default_canvases((1333, 800)) == ((800, 1344), (1344, 800))
    assert P.default_canvases((512, 320)) == ((320, 512), (512, 320))
    b = P.assign_buckets([640, 480, 640, 500, 333, 2000], [480, 640, 360, 500, 517, 100], (1333, 800),
                         P.default_canvases((1333, 800)))
    # a square image fits both canvases; mmdet's flag (w/h > 1 is False) groups it as portrait
    assert b.tolist() == [0, 1, 0, 1, 1, 0]
    assert P.assign_buckets([640], [480], (1333, 800), [(800, 800)]).tolist() == [-1]


def test_data_rle_decoder_matches_pycocotools():
    rng = np.random.default_rng(1)
    for h, w in [(17, 23), (64, 48), (1, 1), (200, 150)]:
        for density in (0.0, 0.05, 0.5, 1.0):
            m = (rng.uniform(size=(h, w)) < density).astype(np.uint8)
            if density not in (0.0, 1.0):
                m = cv2.dilate(m, np.ones((3, 3), np.uint8))
            rle = mask_utils.encode(np.asfortranarray(m))
            s = rle["counts"].decode()
            counts = T.rle_counts_tf(tf.constant(s)).numpy()
            np.testing.assert_array_equal(counts, coco_builder.decode_rle_counts(s))
            dense = np.repeat(np.arange(len(counts)) % 2, counts).reshape(w, h).T
            np.testing.assert_array_equal(dense, mask_utils.decode(rle))


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (29, 37), (517, 333)])
def test_data_mask_crop_matches_mmdet_roi_align(hw):
    """The GT-box crop equals roi_align of mmdet's resized/flipped/padded bitmap (nearest-resized with cv2)."""
    h, w = hw
    rng = np.random.default_rng(h)
    yy, xx = np.mgrid[0:h, 0:w]
    for trial in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, max(4, min(h, w) / 2))
        full = (((xx - cx) ** 2 / 1.7 + (yy - cy) ** 2) < r * r).astype(np.uint8)
        if not full.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(full))
        x0, y0, bw, bh = mask_utils.toBbox(rle)
        for scale, flip, m in [((1333, 800), False, 28), ((512, 320), True, 56), ((256, 160), True, 14)]:
            nw, nh = T.rescale_size(w, h, scale)
            pw, ph = T.ceil_to(nw, 32), T.ceil_to(nh, 32)
            mm = cv2.resize(full, (nw, nh), interpolation=cv2.INTER_NEAREST)
            if flip:
                mm = mm[:, ::-1]
            padded = np.zeros((ph, pw), np.float32)
            padded[:nh, :nw] = mm
            sf = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
            box = np.array([x0, y0, x0 + bw, y0 + bh], np.float32) * sf
            box[0::2] = np.clip(box[0::2], 0, nw)
            box[1::2] = np.clip(box[1::2], 0, nh)
            if flip:
                box = np.array([nw - box[2], box[1], nw - box[0], box[3]], np.float32)
            got = T.mask_crop(tf.constant(rle["counts"].decode()), tf.constant(box), mask_hw=(h, w),
                              new_hw=tf.constant([nh, nw]), pad_hw=tf.constant([ph, pw]),
                              flipped=tf.constant(flip), m=m).numpy()
            ref = T.roi_align_np(padded, box, m)
            np.testing.assert_allclose(got, ref, atol=1e-5)


def test_data_mask_crops_empty_and_binary():
    out = T.mask_crops(tf.constant([], tf.string), tf.zeros([0, 4]), mask_hw=(10, 10), new_hw=(20, 20),
                       pad_hw=(32, 32), flipped=tf.constant(False), m=8)
    assert out.shape == (0, 8, 8) and out.dtype == tf.uint8
    full = np.zeros((10, 10), np.uint8)
    full[2:8, 3:9] = 1
    s = mask_utils.encode(np.asfortranarray(full))["counts"].decode()
    box = tf.constant([[6.0, 4.0, 18.0, 16.0]])
    kw = dict(mask_hw=(10, 10), new_hw=(20, 20), pad_hw=(32, 32), flipped=tf.constant(False), m=8)
    b = T.mask_crops(tf.constant([s]), box, binary=True, **kw).numpy()
    soft = T.mask_crops(tf.constant([s]), box, binary=False, **kw).numpy()
    assert set(np.unique(b)) <= {0, 1} and b.sum() > 0
    np.testing.assert_array_equal(b, (soft >= 128).astype(np.uint8))


def test_data_cv2_nearest_rule():
    """transforms.mask_crop reads the bitmap with cv2 INTER_NEAREST's index rule; check that rule."""
    rng = np.random.default_rng(3)
    for h, w in [(480, 640), (29, 37), (517, 333), (612, 612)]:
        full = (rng.uniform(size=(h, w)) < 0.5).astype(np.uint8)
        for scale in [(1333, 800), (512, 320), (100, 60)]:
            nw, nh = T.rescale_size(w, h, scale)
            ref = cv2.resize(full, (nw, nh), interpolation=cv2.INTER_NEAREST)
            oy = np.minimum(np.floor(np.arange(nh) * (1.0 / (nh / h))).astype(int), h - 1)
            ox = np.minimum(np.floor(np.arange(nw) * (1.0 / (nw / w))).astype(int), w - 1)
            np.testing.assert_array_equal(full[oy][:, ox], ref)


def test_data_tf_backend_close_to_cv2():
    """The pure-TF path decodes identically; its float bilinear is within 1 level of cv2's fixed point."""
    _, data = _jpeg(640, 427, seed=5)
    a, _ = T.decode_resize(tf.constant(data), tf.constant("x"), (1333, 800), "cv2")
    b, _ = T.decode_resize(tf.constant(data), tf.constant("x"), (1333, 800), "tf")
    assert a.shape == b.shape == (800, 1199, 3)
    d = np.abs(a.numpy().astype(int) - b.numpy().astype(int))
    assert d.mean() < 0.3 and d.max() <= 1


def test_data_corrupt_image_in_pipeline_names_file():
    with pytest.raises(Exception, match="broken.jpg"):
        T.decode_resize(tf.constant(b"not a jpeg"), tf.constant("broken.jpg"), (1333, 800), "cv2")
