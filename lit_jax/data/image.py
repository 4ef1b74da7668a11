"""mmdetection 2.11's test-time image preparation in numpy and OpenCV (no TensorFlow).

One code path for every user of single images: the tf.data pipeline runs :func:`decode_resize_np` inside its
``tf.numpy_function`` (cv2 backend), and :mod:`lit_jax.inference` and the exporters run :func:`prepare_image`.
Conventions: sizes ``(h, w)`` unless a name says otherwise; mmdet's ``img_scale`` is ``(long, short)``;
images are RGB uint8 ``(h, w, 3)`` before normalisation and float32 after.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

# mmdet's img_norm_cfg (RGB order).
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


def rescale_size(w: int, h: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv.rescale_size with keep_ratio: ``(new_w, new_h)`` for an image of size w x h.

    ``s = min(max(scale)/max(h, w), min(scale)/min(h, w))``; ``new = int(x*s + 0.5)`` (Python floats).
    """
    long_edge, short_edge = max(scale), min(scale)
    s = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * float(s) + 0.5), int(h * float(s) + 0.5)


def ceil_to(x: int, divisor: int) -> int:
    return int(math.ceil(x / divisor)) * divisor


def decode_bgr(data: bytes, name: str = "?") -> np.ndarray:
    """``cv2.imdecode(IMREAD_COLOR)`` (mmcv's 'color' flag: BGR uint8, EXIF orientation applied).

    Raises ValueError naming ``name`` when the bytes are not an image OpenCV can decode."""
    import cv2

    buf = np.frombuffer(data, np.uint8)
    img = None
    if buf.size:
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        except cv2.error:
            img = None
    if img is None:
        raise ValueError(f"image {name} ({len(data)} bytes) does not decode with cv2.imdecode")
    return img


def resize_keep_ratio(img: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """mmcv.imrescale(bilinear): cv2.resize(INTER_LINEAR) to :func:`rescale_size`. Channel order is kept
    (OpenCV resizes each channel alike, so resizing RGB equals resizing BGR and swapping)."""
    import cv2

    h, w = img.shape[:2]
    new_w, new_h = rescale_size(w, h, scale)
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def decode_resize_np(data: bytes, scale: Sequence[int], name: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """cv2 decode (BGR, EXIF) + mmcv.imrescale(bilinear); returns (RGB uint8 (new_h,new_w,3), [h, w])."""
    import cv2

    img = decode_bgr(data, name)
    h, w = img.shape[:2]
    img = cv2.cvtColor(resize_keep_ratio(img, scale), cv2.COLOR_BGR2RGB)
    return img, np.array([h, w], np.int32)


def normalize_np(img_u8: np.ndarray, mean=MEAN_RGB, std=STD_RGB) -> np.ndarray:
    """mmcv.imnormalize on RGB: float32 ``(x - mean) * (1/std)`` with float32 mean and 1/std (the TF twin is
    ``transforms.normalize``)."""
    mean32 = np.asarray(mean, np.float32)
    stdinv32 = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
    return (img_u8.astype(np.float32) - mean32) * stdinv32


def default_canvases(img_scale: Sequence[int], size_divisor: int = 32) -> tuple[tuple[int, int], ...]:
    """Landscape ``(S, L)`` and portrait ``(L, S)`` canvases, sides rounded up to size_divisor."""
    long_edge, short_edge = max(img_scale), min(img_scale)
    s, l_ = ceil_to(short_edge, size_divisor), ceil_to(long_edge, size_divisor)
    return ((s, l_), (l_, s))


def assign_buckets(widths: Sequence[int], heights: Sequence[int], img_scale: Sequence[int],
                   canvases: Sequence[tuple[int, int]], size_divisor: int = 32) -> np.ndarray:
    """Bucket (canvas index) of each image, or -1 when no canvas holds its padded resized size.

    The smallest-area canvas that holds the image wins; ties go to the canvas whose orientation matches
    mmdet's group flag ``w/h > 1``."""
    out = np.full(len(widths), -1, np.int64)
    cache: dict[tuple[int, int], int] = {}
    for i, (w, h) in enumerate(zip(widths, heights)):
        key = (int(w), int(h))
        if key not in cache:
            nw, nh = rescale_size(key[0], key[1], img_scale)
            ph, pw = ceil_to(nh, size_divisor), ceil_to(nw, size_divisor)
            landscape = key[0] / key[1] > 1
            best, best_key = -1, None
            for c, (ch, cw) in enumerate(canvases):
                if ch >= ph and cw >= pw:
                    match = (cw > ch) == landscape or cw == ch
                    k = (ch * cw, 0 if match else 1, c)
                    if best_key is None or k < best_key:
                        best, best_key = c, k
            cache[key] = best
        out[i] = cache[key]
    return out


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """One image ready for ``detector.predict``.

    image: float32 ``(Hp, Wp, 3)`` normalised, zero-padded bottom/right (:func:`prepare_image`), or the resized
    uint8 RGB image zero-padded the same way (``prepare_image(..., normalize=False)``, the exported models' input);
    img_shape ``(2,)`` int32 (h, w) after the resize; scale_factor ``(4,)`` float32 ``(w_s, h_s, w_s, h_s)``;
    ori_shape ``(2,)`` int32 (h, w) of the original (decoded) image."""
    image: np.ndarray
    img_shape: np.ndarray
    scale_factor: np.ndarray
    ori_shape: np.ndarray


def scale_factor_np(h: int, w: int, new_h: int, new_w: int) -> np.ndarray:
    """mmdet's ``scale_factor = float32[w_s, h_s, w_s, h_s]`` with ``w_s = new_w / w`` in double."""
    w_s, h_s = np.float32(new_w / w), np.float32(new_h / h)
    return np.asarray([w_s, h_s, w_s, h_s], np.float32)


def prepare_image(rgb: np.ndarray, img_scale: Sequence[int], *, mean=MEAN_RGB, std=STD_RGB,
                  size_divisor: int = 32, canvas: Optional[tuple[int, int]] = None,
                  normalize: bool = True) -> PreparedImage:
    """mmdet's test pipeline on an RGB uint8 ``(H, W, 3)`` image: keep-ratio resize to ``img_scale``, normalise,
    zero-pad to a multiple of ``size_divisor`` (``canvas`` None) or to ``canvas`` ``(H, W)``. ``normalize=False``
    keeps the resized image uint8 (the input of the exported models, which normalise inside).

    Raises ValueError when the array is not ``(H, W, 3)`` uint8 or the resized image does not fit ``canvas``."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"an image must be an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    resized = resize_keep_ratio(rgb, img_scale)
    new_h, new_w = resized.shape[:2]
    ph, pw = canvas if canvas is not None else (ceil_to(new_h, size_divisor), ceil_to(new_w, size_divisor))
    if new_h > ph or new_w > pw:
        raise ValueError(f"image {w}x{h} resized to {new_w}x{new_h} does not fit the canvas {pw}x{ph} (WxH)")
    padded = np.zeros((ph, pw, 3), np.float32 if normalize else np.uint8)
    padded[:new_h, :new_w] = normalize_np(resized, mean, std) if normalize else resized
    return PreparedImage(padded, np.asarray([new_h, new_w], np.int32), scale_factor_np(h, w, new_h, new_w),
                         np.asarray([h, w], np.int32))
