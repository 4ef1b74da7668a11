"""A small synthetic COCO-format instance dataset: real JPEG files and a real instances JSON.

Six categories of filled shapes (circle, square, triangle, ellipse, star, ring) of varied size, colour,
rotation and aspect are painted on textured, noisy backgrounds. The annotations follow COCO's conventions:

* non-crowd objects carry polygon masks (``[[x1, y1, x2, y2, ...]]``); an object partly hidden by a later
    one keeps only its visible part and is stored as a compressed RLE (``{'size', 'counts': str}``); rings
    (which have a hole) are always compressed RLEs;
* crowd regions (``iscrowd=1``) are clusters of small same-category shapes annotated as one uncompressed
    RLE (``'counts'`` a list of ints), like COCO's crowd annotations;
* ``bbox`` is ``[x, y, w, h]`` (polygon extents, or the RLE's tight box), ``area`` the mask area;
* category ids are deliberately non-contiguous (1, 2, 4, 5, 7, 9) so the label mapping is exercised.

Images have varied sizes and aspect ratios (landscape, portrait, square, odd sizes). Fixed positions in
each split carry the special cases the loaders must handle: index ``i % 10 == 3`` has no annotation at
all, ``i % 10 == 7`` has only crowd regions, ``i % 5 == 1`` has a crowd region among other objects, and
``i % 20 == 9`` is a tiny image (min side < 32, dropped from training by ``min_size``).

Everything is deterministic given the seed: image ``i`` of a split draws from
``numpy.random.default_rng([seed, split_index, i])``, so a dataset with more images extends a smaller one.

Layout written (mmdetection's COCO layout)::

    OUT/annotations/instances_train2017.json   OUT/train2017/000000000001.jpg ...
    OUT/annotations/instances_val2017.json     OUT/val2017/000000500001.jpg ...
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 4, "name": "triangle", "supercategory": "shape"},
    {"id": 5, "name": "ellipse", "supercategory": "shape"},
    {"id": 7, "name": "star", "supercategory": "shape"},
    {"id": 9, "name": "ring", "supercategory": "shape"},
)
_SHAPES = tuple(c["name"] for c in CATEGORIES)
_CAT_ID = {c["name"]: c["id"] for c in CATEGORIES}

# Image id offsets per split, so ids are unique across the dataset (as in COCO).
SPLITS = (("train2017", 0), ("val2017", 500_000))
_ANN_ID_OFFSET = {"train2017": 1, "val2017": 5_000_001}

_LANDSCAPE = ((640, 480), (640, 427), (640, 360), (500, 375), (600, 400), (612, 612), (640, 512))
_PORTRAIT = ((480, 640), (427, 640), (375, 500), (360, 640))

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------
def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _shape_polygon(rng: np.random.Generator, shape: str, size: float) -> np.ndarray:
    """Vertices (K, 2) of a shape centred at 0 with a bounding radius of about size/2."""
    r = size / 2.0
    angle = rng.uniform(0, 2 * np.pi)
    if shape == "circle":
        k = int(np.clip(np.pi * size / 4, 16, 64))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        return np.stack([r * np.cos(t), r * np.sin(t)], -1)
    if shape == "ellipse":
        k = int(np.clip(np.pi * size / 4, 16, 64))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        ratio = rng.uniform(0.3, 0.65)
        return _rotate(np.stack([r * np.cos(t), r * ratio * np.sin(t)], -1), angle)
    if shape == "square":
        aspect = rng.uniform(0.85, 1.18)
        a = r / np.sqrt(2)
        pts = np.array([[-a * aspect, -a], [a * aspect, -a], [a * aspect, a], [-a * aspect, a]])
        return _rotate(pts, angle)
    if shape == "triangle":
        t = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        rad = r * rng.uniform(0.85, 1.0, 3)
        return _rotate(np.stack([rad * np.cos(t), rad * np.sin(t)], -1), angle)
    if shape == "star":
        inner = rng.uniform(0.38, 0.5)
        t = np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * inner)
        return _rotate(np.stack([rad * np.cos(t), rad * np.sin(t)], -1), angle)
    raise ValueError(shape)


def _polygon_mask(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], h, w)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def _ring_mask(cx: float, cy: float, r_out: float, r_in: float, aspect: float, angle: float, h: int,
               w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, (-dx * s + dy * c) / aspect
    d = np.sqrt(u * u + v * v)
    return (d <= r_out) & (d >= r_in)


def _rle_str(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _rle_uncompressed(mask: np.ndarray) -> dict[str, Any]:
    flat = mask.astype(np.uint8).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:  # counts start with the number of zeros
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _box_from_mask(mask: np.ndarray) -> list[float]:
    bb = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
    return [float(v) for v in bb]


# ----------------------------------------------------------------------------------------------------
# Painting
# ----------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    g = rng.integers(2, 7)
    low = rng.uniform(30, 225, (g, g, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    # A mid-frequency texture: stripes, a checker or blotches.
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        period, ang = rng.uniform(6, 40), rng.uniform(0, np.pi)
        tex = np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period)
    elif kind == 1:
        p = rng.uniform(8, 48)
        tex = (((xx // p) + (yy // p)) % 2) * 2 - 1
    else:
        b = rng.uniform(-1, 1, (max(2, h // 16), max(2, w // 16))).astype(np.float32)
        tex = cv2.resize(b, (w, h), interpolation=cv2.INTER_LINEAR)
    img += rng.uniform(5, 25) * tex[..., None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
    img += rng.normal(0, rng.uniform(3, 14), (h, w, 3)).astype(np.float32)
    return img


def _paint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    base = rng.uniform(0, 255, 3)
    # A linear shading across the object plus its own noise, so colour alone is not a cue.
    g = rng.normal(0, 1.2, 2)
    shade = (xs - xs.mean()) * g[0] + (ys - ys.mean()) * g[1]
    shade = np.clip(shade, -45, 45)
    col = base[None, :] + shade[:, None] + rng.normal(0, rng.uniform(2, 10), (ys.size, 3))
    img[ys, xs] = col


# ----------------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------------
def _image_size(rng: np.random.Generator, index: int, max_side: int) -> tuple[int, int]:
    if index % 20 == 9:  # tiny image
        return int(rng.integers(16, 31)), int(rng.integers(20, 48))
    u = rng.uniform()
    if u < 0.55:
        w, h = _LANDSCAPE[rng.integers(len(_LANDSCAPE))]
    elif u < 0.8:
        w, h = _PORTRAIT[rng.integers(len(_PORTRAIT))]
    else:  # odd sizes and aspect ratios
        w, h = int(rng.integers(120, 641)), int(rng.integers(120, 641))
    f = min(1.0, max_side / max(w, h))
    return max(8, int(round(w * f))), max(8, int(round(h * f)))


def _place(rng, h, w, size, boxes, max_iou=0.45, tries=30):
    for _ in range(tries):
        cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
        b = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
        if not boxes:
            return cx, cy
        bx = np.array(boxes)
        iw = np.clip(np.minimum(bx[:, 2], b[2]) - np.maximum(bx[:, 0], b[0]), 0, None)
        ih = np.clip(np.minimum(bx[:, 3], b[3]) - np.maximum(bx[:, 1], b[1]), 0, None)
        inter = iw * ih
        union = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1]) + size * size - inter
        if (inter / union).max() <= max_iou:
            return cx, cy
    return None


def make_image(rng: np.random.Generator, index: int, max_side: int = 640
               ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Returns a BGR uint8 image and its annotations (without ids) for image ``index`` of a split."""
    w, h = _image_size(rng, index, max_side)
    img = _background(rng, h, w)
    objects = []  # each: dict(kind, category, mask, poly or None, crowd)
    tiny = index % 20 == 9
    n_obj = 0 if (index % 10 in (3, 7)) else int(np.clip(rng.poisson(3.5), 1, 9))
    if tiny:
        n_obj = 1
    n_crowd = 1 if (index % 10 == 7 or index % 5 == 1) and not tiny else 0
    boxes: list[list[float]] = []
    min_side = min(w, h)

    for _ in range(n_crowd):
        shape = _SHAPES[rng.integers(len(_SHAPES))]
        region = rng.uniform(0.25, 0.45) * min_side
        spot = _place(rng, h, w, region, boxes, max_iou=0.1)
        if spot is None:
            continue
        cx, cy = spot
        union = np.zeros((h, w), bool)
        for _m in range(int(rng.integers(5, 14))):
            s = rng.uniform(0.12, 0.25) * region
            px, py = cx + rng.uniform(-0.5, 0.5) * region, cy + rng.uniform(-0.5, 0.5) * region
            if shape == "ring":
                m = _ring_mask(px, py, s / 2, s / 2 * 0.55, 1.0, 0.0, h, w)
            else:
                poly = _shape_polygon(rng, shape, s) + np.array([px, py])
                poly[:, 0] = np.clip(poly[:, 0], 0, w)
                poly[:, 1] = np.clip(poly[:, 1], 0, h)
                m = _polygon_mask(poly, h, w)
            _paint(img, m, rng)
            union |= m
        if union.any():
            boxes.append([cx - region / 2, cy - region / 2, cx + region / 2, cy + region / 2])
            objects.append(dict(category=shape, mask=union, poly=None, crowd=True))

    for _ in range(n_obj):
        shape = _SHAPES[rng.integers(len(_SHAPES))]
        lo = 0.25 if tiny else 0.06
        size = float(np.exp(rng.uniform(np.log(max(10.0, lo * min_side)), np.log(0.65 * min_side))))
        if tiny:
            size = max(size, 8.0)
        spot = _place(rng, h, w, size, boxes)
        if spot is None:
            continue
        cx, cy = spot
        if shape == "ring":
            m = _ring_mask(cx, cy, size / 2, size / 2 * rng.uniform(0.45, 0.7), rng.uniform(0.7, 1.0),
                           rng.uniform(0, np.pi), h, w)
            poly = None
        else:
            poly = _shape_polygon(rng, shape, size) + np.array([cx, cy])
            poly[:, 0] = np.clip(poly[:, 0], 0, w)
            poly[:, 1] = np.clip(poly[:, 1], 0, h)
            poly = np.round(poly, 2)
            m = _polygon_mask(poly, h, w)
        if not m.any():
            continue
        _paint(img, m, rng)
        # Later objects hide the earlier ones.
        for o in objects:
            if (o["mask"] & m).any():
                o["mask"] = o["mask"] & ~m
                o["poly"] = None
        boxes.append([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
        objects.append(dict(category=shape, mask=m, poly=poly, crowd=False))

    img = np.clip(img, 0, 255).astype(np.uint8)
    anns = []
    for o in objects:
        mask = o["mask"]
        area = float(mask.sum())
        if area == 0:
            continue
        if o["crowd"]:
            seg = _rle_uncompressed(mask)
            bbox = _box_from_mask(mask)
        elif o["poly"] is not None:
            poly = o["poly"]
            seg = [[float(v) for v in poly.reshape(-1)]]
            x0, y0 = float(poly[:, 0].min()), float(poly[:, 1].min())
            bbox = [x0, y0, float(poly[:, 0].max()) - x0, float(poly[:, 1].max()) - y0]
        else:
            seg = _rle_str(mask)
            bbox = _box_from_mask(mask)
        if bbox[2] <= 0 or bbox[3] <= 0:
            continue
        anns.append({"category_id": _CAT_ID[o["category"]], "iscrowd": int(o["crowd"]),
                     "bbox": [round(v, 2) for v in bbox], "area": area, "segmentation": seg})
    return img, anns


# ----------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------
def make_synthetic_coco(out: str, num_train: int = 64, num_val: int = 16, seed: int = 0,
                        max_side: int = 640, jpeg_quality: int = 90, progress: bool = False
                        ) -> dict[str, str]:
    """Writes the dataset under ``out``; returns {split_dir_name: annotation json path}."""
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    written = {}
    for split_index, ((split, id_offset), n) in enumerate(zip(SPLITS, (num_train, num_val))):
        img_dir = os.path.join(out, split)
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        ann_id = _ANN_ID_OFFSET[split]
        it = range(n)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"synthetic {split}", unit="img")
        for i in it:
            rng = np.random.default_rng([seed, split_index, i])
            img, anns = make_image(rng, i, max_side=max_side)
            image_id = id_offset + i + 1
            file_name = f"{image_id:012d}.jpg"
            ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), jpeg_quality])
            assert ok
            with open(os.path.join(img_dir, file_name), "wb") as f:
                f.write(buf.tobytes())
            images.append({"id": image_id, "file_name": file_name, "width": int(img.shape[1]),
                           "height": int(img.shape[0]), "license": 1})
            for a in anns:
                annotations.append({"id": ann_id, "image_id": image_id, **a})
                ann_id += 1
        doc = {
            "info": {"description": f"lit_jax synthetic shapes (seed {seed})", "version": "1.0",
                     "year": 2017},
            "licenses": [{"id": 1, "name": "CC0", "url": ""}],
            "images": images,
            "annotations": annotations,
            "categories": [dict(c) for c in CATEGORIES],
        }
        path = os.path.join(out, "annotations", f"instances_{split}.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        written[split] = path
        log.info("wrote %s: %d images, %d annotations", path, len(images), len(annotations))
    return written


def ensure_synthetic_tfds(root: str = "data", num_train: int = 64, num_val: int = 16, seed: int = 0,
                          max_side: int = 640, generate: bool = True) -> tuple[str, str]:
    """Writes (if missing) and builds (if missing) the synthetic dataset; returns ``(data_dir, dataset)``.

    ``generate=False`` (tools that only read it: evaluation) makes and builds nothing: a dataset that is not
    built yet is a FileNotFoundError naming where it was looked for.

    For ``DataConfig(data_dir=..., dataset=...)``: the files go to
    ``root/synthetic_coco/s{seed}_{train}_{val}_{max_side}`` and the tfds build to ``root/tfds`` under the
    name ``synthetic_s{seed}_{train}_{val}_{max_side}``; calling it again is a no-op.
    """
    from lit_jax.data import coco_builder
    tag = f"s{seed}_{num_train}_{num_val}_{max_side}"
    src = os.path.join(root, "synthetic_coco", tag)
    data_dir = os.path.join(root, "tfds")
    if not generate:
        built = os.path.join(data_dir, coco_builder.BUILDER_NAME, f"synthetic_{tag}")
        if not os.path.isdir(built) or not os.path.isdir(src):
            raise FileNotFoundError(f"the synthetic dataset {tag} is not prepared under {os.path.abspath(root)} "
                                    f"(no {built}); training with this config (python -m lit_jax.main) makes it, "
                                    "or set --config.synthetic.root")
        return data_dir, f"{coco_builder.BUILDER_NAME}/synthetic_{tag}"
    if not os.path.isfile(os.path.join(src, "annotations", "instances_val2017.json")):
        make_synthetic_coco(src, num_train=num_train, num_val=num_val, seed=seed, max_side=max_side)
    coco_builder.build(src, data_dir, f"synthetic_{tag}")
    return data_dir, f"{coco_builder.BUILDER_NAME}/synthetic_{tag}"
