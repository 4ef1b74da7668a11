"""The input pipeline's settings (no TensorFlow here: a trainer or benchmark can read them without it)."""
from __future__ import annotations

import dataclasses
from typing import Any

from lit_jax.data.image import MEAN_RGB, STD_RGB, default_canvases


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline settings (names after mmdet's where there is one).

    Attributes:
      data_dir: tfds data dir holding the prepared dataset.
      dataset: ``'coco_instances/NAME[:VERSION]'`` (python -m lit_jax.data.prepare) or ``'coco/2017'``
        (tfds' COCO, box-only).
      train_split, eval_split: split names ('train', 'val' for COCO 2017).
      img_scale: mmdet's ``img_scale`` ``(long, short)``; keep-ratio resize.
      canvases: training/eval buckets ``((H, W), ...)``; None = landscape and portrait canvases derived
        from img_scale (ceil to size_divisor): (800, 1344) and (1344, 800) for (1333, 800).
      size_divisor: mmdet Pad(size_divisor); ``pad_shape`` is the resized size rounded up to it.
      flip_prob: RandomFlip ratio (train only).
      mean, std: Normalize (RGB order, to_rgb=True).
      max_instances: GT slots per image; extra instances are dropped with a logged count.
      with_masks: produce ``gt_masks`` (needs a dataset built with masks).
      mask_size: side m of the per-GT mask crops.
      mask_binary: crops as {0, 1} (``>= 0.5``, mmdet's binarisation) or as uint8 ``round(255 * v)``.
      filter_empty_gt: drop training images without annotations (mmdet's filter_empty_gt).
      min_size: drop training images whose JSON min side is below this (mmdet's _filter_imgs).
      global_batch_size: training images per step over all processes.
      eval_global_batch_size: evaluation images per step over all processes (bucket mode).
      shuffle: shuffle files, records (buffer) and the bucket schedule.
      shuffle_buffer: records per (host, bucket) stream shuffle buffer.
      seed: the one seed of every random choice (shuffles, flips, schedule).
      decode_backend: 'cv2' (parity) or 'tf' (pure graph; see transforms.py).
      num_parallel_calls: per-image map parallelism (-1 = AUTOTUNE).
      prefetch: batches prefetched by tf.data.
    """
    data_dir: str = "data/tfds"
    dataset: str = "coco_instances/coco"
    train_split: str = "train"
    eval_split: str = "val"
    img_scale: tuple[int, int] = (1333, 800)
    canvases: tuple[tuple[int, int], ...] | None = None
    size_divisor: int = 32
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = MEAN_RGB
    std: tuple[float, float, float] = STD_RGB
    max_instances: int = 100
    with_masks: bool = False
    mask_size: int = 56
    mask_binary: bool = True
    filter_empty_gt: bool = True
    min_size: int = 32
    global_batch_size: int = 16
    eval_global_batch_size: int = 8
    shuffle: bool = True
    shuffle_buffer: int = 1024
    seed: int = 0
    decode_backend: str = "cv2"
    num_parallel_calls: int = -1
    prefetch: int = 2

    @classmethod
    def from_dict(cls, d: Any) -> "DataConfig":
        """From a dict or ml_collections.ConfigDict (lists become tuples; unknown keys are an error)."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DataConfig fields: {sorted(unknown)}")
        for k in ("img_scale", "mean", "std"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        if d.get("canvases") is not None:
            d["canvases"] = tuple(tuple(int(v) for v in c) for c in d["canvases"])
        return cls(**d)

    def resolved_canvases(self) -> tuple[tuple[int, int], ...]:
        if self.canvases:
            return tuple((int(h), int(w)) for h, w in self.canvases)
        return default_canvases(self.img_scale, self.size_divisor)
