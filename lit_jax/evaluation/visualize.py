"""Drawing detections on an image (cv2), in the spirit of mmdet's ``imshow_det_bboxes``.

``draw_detections`` is a pure function: it returns a new uint8 RGB image and never touches the input or any
file. A detection is drawn when ``score > score_thr`` (strictly greater, as mmdet). Each class gets a fixed
colour (golden-ratio hue spacing, so neighbouring labels differ clearly); masks are blended into the image
with ``alpha`` (mmdet: 0.5) before the boxes and labels are drawn. ``save_image`` writes an RGB image with
cv2 (converted to BGR) and raises ``OSError`` when the file cannot be written.
"""
from __future__ import annotations

import colorsys
import os
from typing import Any, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["class_color", "draw_detections", "save_image"]

_GOLDEN = 0.618033988749895


def class_color(label: int) -> Tuple[int, int, int]:
    """A fixed, bright RGB colour for a class label (distinct for neighbouring labels)."""
    hue = (int(label) * _GOLDEN + 0.07) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _label_text(label: int, score: float, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        name = str(class_names[label])
    else:
        name = f"class {label}"
    return f"{name}|{score:.2f}"


def draw_detections(image: Any, boxes: Any, scores: Any, labels: Any,
                    class_names: Optional[Sequence[str]] = None, score_thr: float = 0.3,
                    masks: Any = None, *, thickness: int = 2, font_scale: float = 0.5,
                    alpha: float = 0.5, show_text: bool = True) -> np.ndarray:
    """Draws boxes, ``'name|score'`` labels and optional masks; returns a new ``(H, W, 3)`` uint8 image.

    Args:
      image: ``(H, W, 3)`` uint8 RGB (not modified).
      boxes: ``(K, 4)`` ``x1, y1, x2, y2`` in the image's pixels.
      scores: ``(K,)``; a detection is drawn when ``score > score_thr``.
      labels: ``(K,)`` contiguous class labels.
      class_names: ``class_names[label]`` is written next to the score (``'class N'`` when missing).
      masks: optional ``(K, H, W)`` bool/0-1 masks at the image size, blended with the class colour.
      thickness, font_scale: cv2 line thickness and text scale.
      alpha: mask opacity.
      show_text: draw the ``name|score`` label boxes.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {img.dtype} {img.shape}")
    out = np.ascontiguousarray(img.copy())
    h, w = out.shape[:2]
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"boxes, scores and labels disagree: {len(boxes)}, {len(scores)}, {len(labels)}")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim != 3 or masks.shape[0] != len(boxes) or masks.shape[1:] != (h, w):
            raise ValueError(f"masks must be (K, H, W) = ({len(boxes)}, {h}, {w}), got {masks.shape}")
    keep = np.flatnonzero((scores > score_thr) & np.all(np.isfinite(boxes), axis=1))
    if keep.size == 0:
        return out

    if masks is not None:
        for i in keep:
            m = masks[i].astype(bool)
            if m.any():
                color = np.asarray(class_color(labels[i]), np.float64)
                blended = out[m].astype(np.float64) * (1.0 - alpha) + color * alpha
                out[m] = np.clip(np.round(blended), 0, 255).astype(np.uint8)

    # Clip to just outside the image so huge coordinates cannot overflow cv2's int32 points.
    lim = np.array([w, h, w, h], np.float64)
    ib = np.clip(boxes, -1.0, lim).astype(np.int32)  # truncation, as mmdet's astype(np.int32)
    font = cv2.FONT_HERSHEY_SIMPLEX
    text_thickness = max(1, thickness // 2)
    for i in keep:
        color = class_color(labels[i])
        x1, y1, x2, y2 = (int(v) for v in ib[i])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness=thickness, lineType=cv2.LINE_8)
        if not show_text:
            continue
        text = _label_text(int(labels[i]), float(scores[i]), class_names)
        (tw, th), base = cv2.getTextSize(text, font, font_scale, text_thickness)
        tx = min(max(x1, 0), max(w - tw, 0))
        top = y1 - th - base - 2
        if top < 0:  # no room above the box: put the label inside, under the top edge
            top = max(y1, 0)
        cv2.rectangle(out, (tx, top), (tx + tw, top + th + base + 2), color, thickness=cv2.FILLED)
        cv2.putText(out, text, (tx, top + th + 1), font, font_scale, (255, 255, 255), text_thickness,
                    lineType=cv2.LINE_AA)
    return out


def save_image(path: Any, rgb: Any, *, auto_mkdir: bool = True) -> str:
    """Writes an RGB (or grayscale) uint8 image with ``cv2.imwrite``; the format follows the extension.

    Raises ``OSError`` naming the path when the directory cannot be made or cv2 cannot write the file
    (unknown extension, unwritable location). Returns the path.
    """
    path = os.fspath(path)
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"save_image needs an (H, W), (H, W, 3) or (H, W, 4) uint8 image, got {arr.dtype} "
                         f"{arr.shape}")
    if arr.ndim == 3:
        code = cv2.COLOR_RGB2BGR if arr.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        arr = cv2.cvtColor(np.ascontiguousarray(arr), code)
    parent = os.path.dirname(os.path.abspath(path))
    if auto_mkdir:
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot write image {path!r}: cannot create directory {parent!r} ({e})") from e
    try:
        ok = cv2.imwrite(path, arr)
    except cv2.error as e:
        raise OSError(f"cannot write image {path!r}: cv2.imwrite failed ({str(e).strip()})") from e
    if not ok:
        raise OSError(f"cannot write image {path!r}: cv2.imwrite returned False (is the directory writable "
                      "and the extension an image format?)")
    return path
