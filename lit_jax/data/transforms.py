"""Per-image transforms of mmdetection 2.11's pipelines, as TensorFlow graph ops (and their numpy twins).

Train: decode -> keep-ratio resize -> flip -> normalize -> pad (parity_spec.md §2). Conventions:

* sizes are ``(h, w)`` unless a name says otherwise; mmdet's ``scale`` is ``(long, short)`` = (1333, 800);
* boxes are ``[x1, y1, x2, y2]`` float32 in pixels;
* the decode stage returns RGB uint8 (cv2 decodes BGR; the channel swap is exact and mmdet's Normalize
  does it anyway, so doing it on uint8 changes nothing).

Decode/resize backends:

* ``'cv2'`` (default, parity): ``cv2.imdecode(IMREAD_COLOR)`` (EXIF orientation applied, as mmcv) and
  ``cv2.resize(INTER_LINEAR)`` on uint8, which is OpenCV's fixed-point bilinear (11-bit weights), run inside
  one ``tf.numpy_function`` per image (OpenCV releases the GIL, so parallel map calls do overlap).
* ``'tf'``: ``tf.io.decode_jpeg(dct_method='INTEGER_ACCURATE')`` (bit-identical to cv2's decode here,
  but no EXIF orientation) + ``tf.image.resize(bilinear, antialias=False)`` in float, rounded to uint8,
  which differs from cv2's fixed point by 1 level on ~12% of the pixels (mean 0.12 levels; docs/data.md).
  Pure graph.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from lit_jax.data.image import (  # noqa: F401  (the numpy twins, re-exported for the pipeline and tests)
    MEAN_RGB, STD_RGB, ceil_to, decode_resize_np, normalize_np, rescale_size)


# ----------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------
def rescale_size_tf(h: tf.Tensor, w: tf.Tensor, scale: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
    """Graph twin of rescale_size in float64 (IEEE double, so the same as Python): ``(new_h, new_w)``."""
    long_edge, short_edge = float(max(scale)), float(min(scale))
    h = tf.cast(h, tf.float64)
    w = tf.cast(w, tf.float64)
    s = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
    new_h = tf.cast(tf.floor(h * s + 0.5), tf.int32)
    new_w = tf.cast(tf.floor(w * s + 0.5), tf.int32)
    return new_h, new_w


def scale_factor_tf(h, w, new_h, new_w) -> tf.Tensor:
    """mmdet's ``scale_factor = float32[w_s, h_s, w_s, h_s]``, ``w_s = new_w / w`` in double."""
    w_s = tf.cast(tf.cast(new_w, tf.float64) / tf.cast(w, tf.float64), tf.float32)
    h_s = tf.cast(tf.cast(new_h, tf.float64) / tf.cast(h, tf.float64), tf.float32)
    return tf.stack([w_s, h_s, w_s, h_s])


# ----------------------------------------------------------------------------------------------------
# Decode + resize
# ----------------------------------------------------------------------------------------------------
def decode_resize(data: tf.Tensor, name: tf.Tensor, scale: Sequence[int], backend: str = "cv2"
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Decoded and keep-ratio resized RGB uint8 ``(new_h, new_w, 3)`` and the decoded size ``[h, w]``."""
    scale = tuple(int(s) for s in scale)
    if backend == "cv2":
        def fn(d, n):
            d = d.item() if isinstance(d, np.ndarray) else d  # 0-d object array when run eagerly
            n = n.item() if isinstance(n, np.ndarray) else n
            return decode_resize_np(d, scale, n.decode("utf-8", "replace"))
        img, ori = tf.numpy_function(fn, [data, name], [tf.uint8, tf.int32], stateful=False)
        img = tf.ensure_shape(img, [None, None, 3])
        ori = tf.ensure_shape(ori, [2])
        return img, ori
    if backend == "tf":
        # INTEGER_ACCURATE makes libjpeg's IDCT the same as OpenCV's (decode_image would use the fast one).
        img = tf.cond(tf.io.is_jpeg(data),
                      lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
        img = tf.ensure_shape(img, [None, None, 3])
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        new_h, new_w = rescale_size_tf(h, w, scale)
        out = tf.image.resize(img, tf.stack([new_h, new_w]), method="bilinear", antialias=False)
        out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
        return out, tf.stack([h, w])
    raise ValueError(f"unknown decode backend {backend!r} (use 'cv2' or 'tf')")


# ----------------------------------------------------------------------------------------------------
# Boxes, flip, normalize, pad
# ----------------------------------------------------------------------------------------------------
def resize_boxes(boxes: tf.Tensor, scale_factor: tf.Tensor, new_h, new_w) -> tf.Tensor:
    """mmdet Resize._resize_bboxes: ``boxes * scale_factor`` then clip x to [0,new_w], y to [0,new_h]."""
    b = boxes * scale_factor[None, :]
    wf, hf = tf.cast(new_w, tf.float32), tf.cast(new_h, tf.float32)
    x = tf.clip_by_value(b[:, 0::2], 0.0, wf)
    y = tf.clip_by_value(b[:, 1::2], 0.0, hf)
    return tf.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)


def flip_boxes(boxes: tf.Tensor, new_w) -> tf.Tensor:
    """mmdet RandomFlip (horizontal): ``x1' = w - x2``, ``x2' = w - x1`` (float32)."""
    wf = tf.cast(new_w, tf.float32)
    return tf.stack([wf - boxes[:, 2], boxes[:, 1], wf - boxes[:, 0], boxes[:, 3]], axis=1)


def normalize(img_u8: tf.Tensor, mean=MEAN_RGB, std=STD_RGB) -> tf.Tensor:
    """mmcv.imnormalize on RGB: float32 ``(x - mean) * (1/std)`` with float32 mean and 1/std (as cv2)."""
    mean32 = tf.constant(np.asarray(mean, np.float32))
    stdinv32 = tf.constant((1.0 / np.asarray(std, np.float64)).astype(np.float32))
    return (tf.cast(img_u8, tf.float32) - mean32) * stdinv32


def pad_to(img: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Zero-pads bottom/right to a static (height, width); fails if the image does not fit."""
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    with tf.control_dependencies([
            tf.debugging.assert_less_equal(h, height, message=f"image taller than canvas height {height}"),
            tf.debugging.assert_less_equal(w, width, message=f"image wider than canvas width {width}")]):
        out = tf.pad(img, [[0, height - h], [0, width - w], [0, 0]])
    return tf.ensure_shape(out, [height, width, img.shape[-1]])


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------
def rle_counts_tf(s: tf.Tensor) -> tf.Tensor:
    """Run lengths (int64) of one compressed COCO RLE string (pycocotools' rleFrString), vectorised."""
    c = tf.cast(tf.io.decode_raw(s, tf.uint8), tf.int64) - 48
    n = tf.shape(c, out_type=tf.int64)[0]
    end = tf.equal(tf.bitwise.bitwise_and(c, 0x20), 0)
    gid = tf.cumsum(tf.cast(end, tf.int64), exclusive=True)
    num = tf.reduce_sum(tf.cast(end, tf.int64))
    idx = tf.range(n, dtype=tf.int64)
    starts = tf.math.unsorted_segment_min(idx, gid, num)
    k = idx - tf.gather(starts, gid)
    payload = tf.bitwise.left_shift(tf.bitwise.bitwise_and(c, 0x1F), 5 * k)
    x = tf.math.unsorted_segment_sum(payload, gid, num)
    last_c = tf.boolean_mask(c, end)
    last_k = tf.boolean_mask(k, end)
    neg = tf.not_equal(tf.bitwise.bitwise_and(last_c, 0x10), 0)
    x = tf.where(neg, tf.bitwise.bitwise_or(x, tf.bitwise.left_shift(tf.constant(-1, tf.int64),
                                                                     5 * (last_k + 1))), x)
    i = tf.range(num, dtype=tf.int64)
    even = tf.logical_and(tf.equal(i % 2, 0), i >= 2)
    odd = tf.equal(i % 2, 1)
    cs_even = tf.cumsum(tf.where(even, x, 0))
    cs_odd = tf.cumsum(tf.where(odd, x, 0))
    return tf.where(tf.equal(i, 0), x, tf.where(odd, cs_odd, cs_even))


def _axis_weights(start, length, m: int, size, grid):
    """Row (or column) weights ``A (m, win)`` of mmcv roi_align (aligned, avg) along one axis.

    The samples of bin ``p`` are at ``start + p*bin + (i + .5)*bin/grid`` (float32, mmcv's order);
    each contributes mmcv's bilinear_interpolate weights on the ``size``-long axis (0 outside
    ``[-1, size]``; clamped at 0; the last index used alone at and beyond ``size - 1``).
    Returns ``(A, first_index, window_length)``.
    """
    bin_size = length / float(m)
    g = tf.maximum(grid, 1)
    j = tf.range(m * g)
    p = tf.cast(j // g, tf.float32)
    it = tf.cast(j % g, tf.float32)
    pos = start + p * bin_size + (it + 0.5) * bin_size / tf.cast(g, tf.float32)
    sizef = tf.cast(size, tf.float32)
    valid = tf.logical_and(pos >= -1.0, pos <= sizef)
    pos = tf.maximum(pos, 0.0)
    low = tf.cast(tf.floor(pos), tf.int32)  # (int) truncation == floor as pos >= 0
    at_end = low >= size - 1
    low = tf.where(at_end, size - 1, low)
    high = tf.where(at_end, size - 1, low + 1)
    frac = tf.where(at_end, 0.0, pos - tf.cast(low, tf.float32))
    vf = tf.cast(valid, tf.float32)
    w_low, w_high = (1.0 - frac) * vf, frac * vf
    low = tf.clip_by_value(low, 0, size - 1)
    high = tf.clip_by_value(high, 0, size - 1)
    first = tf.reduce_min(low)
    win = tf.reduce_max(high) - first + 1
    seg_low = (j // g) * win + (low - first)
    seg_high = (j // g) * win + (high - first)
    a = tf.math.unsorted_segment_sum(tf.concat([w_low, w_high], 0), tf.concat([seg_low, seg_high], 0),
                                     m * win)
    return tf.reshape(a, [m, win]), first, win


def mask_crop(rle: tf.Tensor, box: tf.Tensor, *, mask_hw, new_hw, pad_hw, flipped, m: int) -> tf.Tensor:
    """mmdet's mask target of one GT for the RoI = its own box: float32 ``(m, m)`` in [0, 1].

    Equals ``roi_align(gt_mask, box, (m, m), spatial_scale=1, sampling_ratio=0, aligned=True)`` (mmcv,
    adaptive ``ceil(roi/m)`` samples per bin, avg) where ``gt_mask`` is mmdet's mask after Resize
    (``cv2.resize(INTER_NEAREST)`` of the ``mask_hw`` bitmap to ``new_hw``), RandomFlip and Pad (zeros to
    ``pad_hw``). It is computed as ``A_y @ M @ A_x^T`` over the box's window only, reading ``M`` straight
    from the RLE (no full-size bitmap is built).
    """
    counts = rle_counts_tf(rle)
    ends = tf.cumsum(counts)
    h0, w0 = tf.cast(mask_hw[0], tf.int64), tf.cast(mask_hw[1], tf.int64)
    new_h, new_w = new_hw[0], new_hw[1]
    pad_h, pad_w = pad_hw[0], pad_hw[1]
    # roi_align aligned=True: coordinates shifted by -0.5.
    sx, sy = box[0] - 0.5, box[1] - 0.5
    ex, ey = box[2] - 0.5, box[3] - 0.5
    rw, rh = ex - sx, ey - sy
    gh = tf.cast(tf.math.ceil(rh / float(m)), tf.int32)
    gw = tf.cast(tf.math.ceil(rw / float(m)), tf.int32)
    ay, r0, hwin = _axis_weights(sy, rh, m, pad_h, gh)
    ax, c0, wwin = _axis_weights(sx, rw, m, pad_w, gw)
    # The padded, flipped, nearest-resized mask on the window.
    rows = r0 + tf.range(hwin)
    cols = c0 + tf.range(wwin)
    ify = 1.0 / (tf.cast(new_h, tf.float64) / tf.cast(h0, tf.float64))  # cv2 resizeNN: 1/(dst/src)
    ifx = 1.0 / (tf.cast(new_w, tf.float64) / tf.cast(w0, tf.float64))
    cols_r = tf.where(flipped, new_w - 1 - cols, cols)
    oy = tf.minimum(tf.cast(tf.floor(tf.cast(rows, tf.float64) * ify), tf.int64), h0 - 1)
    ox = tf.minimum(tf.cast(tf.floor(tf.cast(cols_r, tf.float64) * ifx), tf.int64), w0 - 1)
    lin = ox[None, :] * h0 + oy[:, None]  # column-major index into the original bitmap
    run = tf.searchsorted(ends, tf.reshape(lin, [-1]), side="right")
    val = tf.cast(tf.equal(run % 2, 1), tf.float32)
    inside = tf.logical_and(rows[:, None] < new_h, (cols[None, :] < new_w) & (cols[None, :] >= 0))
    mwin = tf.reshape(val, [hwin, wwin]) * tf.cast(inside, tf.float32)
    out = tf.matmul(tf.matmul(ay, mwin), ax, transpose_b=True)
    count = tf.cast(tf.maximum(gh * gw, 1), tf.float32)
    out = out / count
    nonempty = tf.logical_and(gh > 0, gw > 0)
    return tf.where(nonempty, out, tf.zeros_like(out))


def mask_crops(rles: tf.Tensor, boxes: tf.Tensor, *, mask_hw, new_hw, pad_hw, flipped, m: int,
               binary: bool = True) -> tf.Tensor:
    """``(n, m, m)`` uint8 crops of n GT masks: ``>= 0.5`` as {0,1} if binary, else ``round(255*v)``."""
    def one(args):
        r, b = args
        return mask_crop(r, b, mask_hw=mask_hw, new_hw=new_hw, pad_hw=pad_hw, flipped=flipped, m=m)
    soft = tf.map_fn(one, (rles, boxes), fn_output_signature=tf.TensorSpec([m, m], tf.float32))
    soft = tf.reshape(soft, [-1, m, m])
    if binary:
        return tf.cast(soft >= 0.5, tf.uint8)
    return tf.cast(tf.round(tf.clip_by_value(soft, 0.0, 1.0) * 255.0), tf.uint8)


# ----------------------------------------------------------------------------------------------------
# numpy references (tests, docs)
# ----------------------------------------------------------------------------------------------------
def roi_align_np(mask: np.ndarray, box: Sequence[float], m: int) -> np.ndarray:
    """Direct mmcv roi_align (aligned, sampling_ratio=0, avg, scale 1) of a 2-D array: every sample point's
    bilinear_interpolate in float32, then the bin mean (independent of mask_crop's separable form)."""
    H, W = mask.shape
    f32 = np.float32
    sx, sy = f32(box[0]) - f32(0.5), f32(box[1]) - f32(0.5)
    ex, ey = f32(box[2]) - f32(0.5), f32(box[3]) - f32(0.5)
    rw, rh = ex - sx, ey - sy
    bw, bh = rw / f32(m), rh / f32(m)
    gh, gw = int(np.ceil(rh / f32(m))), int(np.ceil(rw / f32(m)))
    if gh == 0 or gw == 0:
        return np.zeros((m, m), np.float64)
    p = np.arange(m, dtype=f32)
    y = sy + p[:, None] * bh + (np.arange(gh, dtype=f32)[None, :] + f32(0.5)) * bh / f32(gh)  # (m, gh)
    x = sx + p[:, None] * bw + (np.arange(gw, dtype=f32)[None, :] + f32(0.5)) * bw / f32(gw)  # (m, gw)
    Y = y.reshape(m, 1, gh, 1).astype(f32)
    X = x.reshape(1, m, 1, gw).astype(f32)
    Y, X = np.broadcast_arrays(Y, X)
    out_of = (Y < -1.0) | (Y > H) | (X < -1.0) | (X > W)
    Y, X = np.maximum(Y, f32(0)), np.maximum(X, f32(0))
    yl, xl = Y.astype(np.int64), X.astype(np.int64)
    ye, xe = yl >= H - 1, xl >= W - 1
    yl, xl = np.where(ye, H - 1, yl), np.where(xe, W - 1, xl)
    yh, xh = np.where(ye, H - 1, yl + 1), np.where(xe, W - 1, xl + 1)
    Y, X = np.where(ye, yl.astype(f32), Y), np.where(xe, xl.astype(f32), X)
    ly, lx = Y - yl, X - xl
    hy, hx = f32(1) - ly, f32(1) - lx
    v = (hy * hx * mask[yl, xl] + hy * lx * mask[yl, xh] + ly * hx * mask[yh, xl] + ly * lx * mask[yh, xh])
    v = np.where(out_of, 0.0, v)
    return v.sum(axis=(2, 3), dtype=np.float64) / max(gh * gw, 1)
