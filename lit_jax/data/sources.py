"""Readers of the prepared datasets, all giving the same element layout to the input pipeline.

Element (one image; tf tensors)::

    image        tf.string   the encoded file, undecoded
    image_id     int64
    filename     tf.string
    height,width int64       the JSON's (mmdet's img_info) size
    boxes        (n, 4) f32  [x1, y1, x2, y2] in pixels of the original image
    labels       (n,) int64  contiguous labels
    is_crowd     (n,) bool
    skip_train   (n,) bool   mmdet's _parse_ann_info drops it (see coco_builder)
    masks        (n,) string compressed COCO RLE counts at (height, width); '' without masks
    ann_ids      (n,) int64

Two sources:

* ``coco_instances/NAME[:VERSION]``: built by ``python -m lit_jax.data.prepare`` (boxes and masks, with
  a per-split index in its metadata, so no pass over the records is needed to plan buckets/shards);
* ``coco/2017`` (or any ``coco/<config>``): tfds' own COCO, box-only, read from an already prepared tfds
  data dir (it cannot be downloaded in this environment). Its boxes are stored normalised, so the pixel
  boxes are ``bbox * [h, w, h, w]`` (float32, ~1e-4 px from the JSON); its ``area`` is an int; the
  index (image sizes) costs one pass over the split's records at start-up (``tf.image.extract_jpeg_shape``
  on every image); EXIF orientation is not known to it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import tensorflow as tf

from lit_jax.data import coco_builder
from lit_jax.evaluation.coco_classes import COCO_CATEGORY_IDS  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

INDEX_KEYS = ("image_id", "width", "height", "decoded_width", "decoded_height", "has_annotations",
              "num_train_instances")


def _split_name_version(spec: str) -> tuple[str, str | None]:
    if ":" in spec:
        a, v = spec.split(":", 1)
        return a, v
    return spec, None


class Source:
    """A prepared dataset: its categories, per-split index and element stream."""

    name: str
    category_ids: list[int]
    category_names: list[str]
    with_masks: bool

    def index(self, split: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def records(self, split: str, *, shuffle_files: bool = False, seed: int | None = None
                ) -> tf.data.Dataset:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def _read_config(shuffle_files: bool, seed: int | None):
    import tensorflow_datasets as tfds
    return tfds.ReadConfig(shuffle_seed=seed if shuffle_files else None,
                           shuffle_reshuffle_each_iteration=True, add_tfds_id=False)


class CocoInstancesSource(Source):
    """``coco_instances/NAME[:VERSION]`` under data_dir."""

    def __init__(self, data_dir: str, name: str, version: str | None = None):
        self.builder = coco_builder.load_builder(data_dir, name, version)
        md = self.builder.info.metadata
        if md is None or "category_ids" not in md:
            raise ValueError(f"{self.builder.data_dir}: metadata.json lacks category_ids; rebuild it")
        self.name = f"{coco_builder.BUILDER_NAME}/{name}"
        self.category_ids = list(md["category_ids"])
        self.category_names = list(md["category_names"])
        self.with_masks = bool(md.get("with_masks", True))
        self._index = md["index"]
        self.split_info = md["splits"]

    def index(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._index:
            raise KeyError(f"{self.name}: no split {split!r} (have {sorted(self._index)})")
        ix = self._index[split]
        return {k: np.asarray(ix[k], np.bool_ if k == "has_annotations" else np.int64) for k in INDEX_KEYS}

    def records(self, split, *, shuffle_files=False, seed=None):
        import tensorflow_datasets as tfds
        ds = self.builder.as_dataset(split=split, shuffle_files=shuffle_files,
                                     decoders={"image": tfds.decode.SkipDecoding()},
                                     read_config=_read_config(shuffle_files, seed))

        def fmt(e):
            o = e["objects"]
            return {
                "image": e["image"], "image_id": e["image/id"], "filename": e["image/filename"],
                "height": e["image/height"], "width": e["image/width"],
                "boxes": tf.reshape(o["bbox"], [-1, 4]), "labels": o["label"], "is_crowd": o["is_crowd"],
                "skip_train": o["skip_train"], "masks": o["mask"], "ann_ids": o["id"],
            }
        return ds.map(fmt, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class TfdsCocoSource(Source):
    """tfds' ``coco/<config>`` (box-only), read from a prepared data dir."""

    def __init__(self, data_dir: str, config: str = "2017", version: str | None = None):
        import tensorflow_datasets as tfds
        root = os.path.join(data_dir, "coco", config)
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"tfds coco/{config} is not prepared under {data_dir} ({root} missing). It cannot be "
                "downloaded here: prepare it where the internet is reachable (`tfds build coco/2017`) and "
                "copy the data dir, or build the local COCO files with `python -m lit_jax.data.prepare`.")
        if version is None:
            versions = sorted((d for d in os.listdir(root) if d[0].isdigit()),
                              key=lambda v: tuple(int(x) for x in v.split(".")))
            if not versions:
                raise FileNotFoundError(f"no version under {root}")
            version = versions[-1]
        self.builder = tfds.builder_from_directory(os.path.join(root, version))
        self.name = f"coco/{config}"
        names = list(self.builder.info.features["objects"]["label"].names)
        self.category_names = names
        self.category_ids = list(COCO_CATEGORY_IDS) if len(names) == 80 else list(range(1, len(names) + 1))
        self.with_masks = False
        self._index: dict[str, dict[str, np.ndarray]] = {}

    def records(self, split, *, shuffle_files=False, seed=None):
        import tensorflow_datasets as tfds
        decoders = {"image": tfds.decode.SkipDecoding()}
        if "panoptic_image" in self.builder.info.features:
            decoders["panoptic_image"] = tfds.decode.SkipDecoding()
        ds = self.builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders,
                                     read_config=_read_config(shuffle_files, seed))

        def fmt(e):
            shape = tf.image.extract_jpeg_shape(e["image"])
            h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
            o = e["objects"]
            b = tf.reshape(o["bbox"], [-1, 4])  # ymin, xmin, ymax, xmax normalised
            boxes = tf.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], axis=1)
            bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            skip = (bw < 1.0) | (bh < 1.0) | (o["area"] <= 0)
            n = tf.shape(o["label"])[0]
            return {
                "image": e["image"], "image_id": e["image/id"], "filename": e["image/filename"],
                "height": tf.cast(shape[0], tf.int64), "width": tf.cast(shape[1], tf.int64),
                "boxes": boxes, "labels": o["label"], "is_crowd": o["is_crowd"], "skip_train": skip,
                "masks": tf.fill([n], ""), "ann_ids": o["id"],
            }
        return ds.map(fmt, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def index(self, split):
        if split not in self._index:
            log.info("%s: one pass over split %s to read image sizes (tfds coco has no size fields)",
                     self.name, split)

            def small(e):
                return {"image_id": e["image_id"], "h": e["height"], "w": e["width"],
                        "n": tf.shape(e["labels"])[0]}
            ids, hs, ws, ns = [], [], [], []
            for e in self.records(split).map(small).as_numpy_iterator():
                ids.append(e["image_id"])
                hs.append(e["h"])
                ws.append(e["w"])
                ns.append(e["n"])
            hs_, ws_ = np.asarray(hs, np.int64), np.asarray(ws, np.int64)
            self._index[split] = {
                "image_id": np.asarray(ids, np.int64), "width": ws_, "height": hs_,
                "decoded_width": ws_, "decoded_height": hs_,
                "has_annotations": np.asarray(ns) > 0,
                # Not known without a second look at the boxes; only used for reporting.
                "num_train_instances": np.asarray(ns, np.int64),
            }
        return self._index[split]


def open_source(data_dir: str, dataset: str) -> Source:
    """``dataset``: ``coco_instances/NAME[:VERSION]`` or ``coco/CONFIG[:VERSION]`` (tfds' COCO)."""
    spec, version = _split_name_version(dataset)
    parts = spec.split("/")
    if len(parts) != 2:
        raise ValueError(f"dataset {dataset!r}: want 'coco_instances/NAME' or 'coco/2017'")
    builder, config = parts
    if builder == coco_builder.BUILDER_NAME:
        return CocoInstancesSource(data_dir, config, version)
    if builder == "coco":
        return TfdsCocoSource(data_dir, config, version)
    raise ValueError(f"dataset {dataset!r}: unknown builder {builder!r}")


def describe(src: Source) -> dict[str, Any]:
    return {"name": src.name, "num_classes": src.num_classes, "category_ids": src.category_ids,
            "with_masks": src.with_masks}
