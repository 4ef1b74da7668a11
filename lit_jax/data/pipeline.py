"""The tf.data input pipeline: mmdet 2.11's train/test pipelines with static shapes, per-host sharding and
global ``jax.Array`` batches (parity_spec.md §2, design.md "Static shapes" and "Devices and hosts").

Train, per image (graph ops; the only Python is cv2's decode+resize in one ``tf.numpy_function``, see
transforms.py): decode -> keep-ratio resize to ``img_scale`` -> boxes ``* scale_factor`` and clipped ->
horizontal flip with ``flip_prob`` -> normalize (RGB, mean/std) -> zero pad bottom/right to the bucket's
canvas. Targets are the non-crowd annotations that mmdet keeps (``skip_train`` False), padded to
``max_instances`` with a validity mask; crowd regions stay in the dataset but are not targets (mmdet's
``gt_bboxes_ignore`` is never collected). Optional mask targets are per-GT ``(m, m)`` crops (see
``transforms.mask_crop``).

Which images train (mmdet CocoDataset._filter_imgs): images with at least one annotation of a known
category (crowd-only and tiny-only images count as annotated) and ``min(w, h) >= min_size`` (JSON size).

Buckets: every image goes to the smallest-area canvas that holds its 32-padded resized size (ties: the
canvas whose orientation matches mmdet's group flag ``w/h > 1``); the default canvases for (1333, 800) are
landscape (800, 1344) and portrait (1344, 800). Each (host, bucket) has its own stream; a schedule that is
the same on every host (seeded, reshuffled per epoch) picks the bucket of each step, so every step has one
static shape across all hosts. An epoch has ``sum_b ceil(N_b / global_batch)`` steps (mmdet's
DistributedGroupSampler length); a bucket stream continues into its next shuffled pass when its share is
not a multiple of the batch (mmdet instead repeats random images), so over E epochs every image is seen
E times (E or E + 1 when the bucket size is not a multiple of the batch).

Hosts: the training images of each bucket, sorted by id, are dealt round-robin to the processes; a host
reads every record but decodes only its own. Evaluation deals all images the same way and pads each
host's bucket streams with invalid entries (``valid`` False) to a common number of steps.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from lit_jax.data import sources as sources_lib
from lit_jax.data import transforms as T
from lit_jax.data.config import DataConfig  # noqa: F401  (re-exported)
from lit_jax.data.image import assign_buckets, default_canvases  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

try:  # the input pipeline runs on the host CPU; keep TensorFlow off any accelerator JAX uses
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised, or no GPU build
    pass

TRAIN_KEYS = ("images", "gt_boxes", "gt_labels", "gt_valid", "img_shape", "pad_shape", "scale_factor",
              "image_id", "ori_shape", "flipped")
EVAL_KEYS = ("images", "image_id", "ori_shape", "img_shape", "pad_shape", "scale_factor", "valid")


def _seed(cfg_seed: int, *xs: int) -> int:
    return int(np.random.SeedSequence([int(cfg_seed) & 0xFFFFFFFF, *[int(x) for x in xs]])
               .generate_state(1, np.uint32)[0])


def _deal(ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Round-robin share of sorted ids; a host left empty by a tiny bucket borrows one image."""
    ids = np.sort(ids)
    mine = ids[process_index::process_count]
    if mine.size == 0 and ids.size:
        mine = ids[process_index % ids.size:][:1]
    return mine


def _processes(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _lookup_table(ids: np.ndarray, values: np.ndarray) -> tf.lookup.StaticHashTable:
    init = tf.lookup.KeyValueTensorInitializer(tf.constant(np.asarray(ids, np.int64)),
                                               tf.constant(np.asarray(values, np.int64)))
    return tf.lookup.StaticHashTable(init, default_value=-1)


def _options(cfg: DataConfig) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.max_intra_op_parallelism = 1
    opts.experimental_optimization.map_parallelization = True
    return opts


def _pad_first(x: tf.Tensor, n: int, value=0) -> tf.Tensor:
    """Pads (or has already truncated) the leading axis of x to exactly n."""
    k = tf.shape(x)[0]
    pads = [[0, n - k]] + [[0, 0]] * (len(x.shape) - 1)
    out = tf.pad(x, pads, constant_values=tf.cast(value, x.dtype))
    return tf.ensure_shape(out, [n] + x.shape.as_list()[1:])


# ----------------------------------------------------------------------------------------------------
# Per-image transforms
# ----------------------------------------------------------------------------------------------------
def _resized(e, cfg: DataConfig):
    img, ori = T.decode_resize(e["image"], e["filename"], cfg.img_scale, cfg.decode_backend)
    new_h, new_w = tf.shape(img)[0], tf.shape(img)[1]
    sf = T.scale_factor_tf(ori[0], ori[1], new_h, new_w)
    d = cfg.size_divisor
    pad_hw = tf.stack([(new_h + d - 1) // d * d, (new_w + d - 1) // d * d])
    return img, ori, new_h, new_w, sf, pad_hw


def train_transform(counter, e, *, canvas: tuple[int, int], cfg: DataConfig, seed: int
                    ) -> dict[str, tf.Tensor]:
    """One training image -> fixed-shape tensors (see docs/data.md for the layout)."""
    img, ori, new_h, new_w, sf, pad_hw = _resized(e, cfg)
    # The builder checks this when it verifies images; a build without verification is checked here,
    # before boxes in the JSON's pixels are scaled onto an image of another size.
    json_hw = tf.cast(tf.stack([e["height"], e["width"]]), tf.int32)
    fits = tf.reduce_all(tf.equal(ori, json_hw)) | tf.reduce_all(tf.equal(ori, json_hw[::-1]))
    with tf.control_dependencies([tf.debugging.Assert(fits, [
            "size_mismatch: image", e["filename"], "(id", e["image_id"], ") decodes to h, w =", ori,
            "but the JSON says", json_hw])]):
        img = tf.identity(img)
    keep = tf.logical_not(e["is_crowd"] | e["skip_train"])
    boxes = tf.boolean_mask(e["boxes"], keep)
    labels = tf.boolean_mask(e["labels"], keep)
    n_all = tf.shape(boxes)[0]
    m = cfg.max_instances
    truncated = tf.maximum(n_all - m, 0)
    boxes, labels = boxes[:m], labels[:m]
    n = tf.shape(boxes)[0]
    boxes = T.resize_boxes(boxes, sf, new_h, new_w)
    if cfg.flip_prob > 0:
        u = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(seed, tf.int64), counter]))
        flip = u < cfg.flip_prob
    else:
        flip = tf.constant(False)
    img = tf.cond(flip, lambda: tf.reverse(img, axis=[1]), lambda: img)
    boxes = tf.cond(flip, lambda: T.flip_boxes(boxes, new_w), lambda: boxes)
    image = T.pad_to(T.normalize(img, cfg.mean, cfg.std), canvas[0], canvas[1])
    out = {
        "images": image,
        "gt_boxes": _pad_first(boxes, m),
        "gt_labels": _pad_first(tf.cast(labels, tf.int32), m, -1),
        "gt_valid": tf.range(m) < n,
        "img_shape": tf.stack([new_h, new_w]),
        "pad_shape": tf.cast(pad_hw, tf.int32),
        "scale_factor": sf,
        "image_id": tf.cast(e["image_id"], tf.int32),
        "ori_shape": ori,
        "flipped": flip,
        "gt_truncated": truncated,
    }
    if cfg.with_masks:
        rles = tf.boolean_mask(e["masks"], keep)[:m]
        # mmdet rescales the bitmap of the JSON size with the same rule (BitmapMasks.rescale).
        mh, mw = e["height"], e["width"]
        mnh, mnw = T.rescale_size_tf(mh, mw, cfg.img_scale)
        crops = T.mask_crops(rles, boxes, mask_hw=(mh, mw), new_hw=(mnh, mnw), pad_hw=pad_hw,
                             flipped=flip, m=cfg.mask_size, binary=cfg.mask_binary)
        out["gt_masks"] = _pad_first(crops, m)
    return out


def eval_transform(e, *, canvas: tuple[int, int] | None, cfg: DataConfig) -> dict[str, tf.Tensor]:
    """One evaluation image; padded to the canvas, or (canvas None) to its own pad_shape."""
    img, ori, new_h, new_w, sf, pad_hw = _resized(e, cfg)
    image = T.normalize(img, cfg.mean, cfg.std)
    if canvas is None:
        image = tf.pad(image, [[0, pad_hw[0] - new_h], [0, pad_hw[1] - new_w], [0, 0]])
    else:
        image = T.pad_to(image, canvas[0], canvas[1])
    return {
        "images": image,
        "image_id": tf.cast(e["image_id"], tf.int32),
        "ori_shape": ori,
        "img_shape": tf.stack([new_h, new_w]),
        "pad_shape": tf.cast(pad_hw, tf.int32),
        "scale_factor": sf,
        "valid": tf.constant(True),
    }


def _dummy_eval(canvas: tuple[int, int]) -> dict[str, tf.Tensor]:
    return {
        "images": tf.zeros([canvas[0], canvas[1], 3], tf.float32),
        "image_id": tf.constant(-1, tf.int32),
        "ori_shape": tf.zeros([2], tf.int32),
        "img_shape": tf.zeros([2], tf.int32),
        "pad_shape": tf.zeros([2], tf.int32),
        "scale_factor": tf.ones([4], tf.float32),
        "valid": tf.constant(False),
    }


# ----------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BucketPlan:
    canvas: tuple[int, int]
    num_images: int           # over all hosts
    local_ids: np.ndarray     # this host's image ids
    steps_per_epoch: int      # the same on every host


def plan_train(cfg: DataConfig, index: dict[str, np.ndarray], process_index: int, process_count: int
               ) -> tuple[list[BucketPlan], dict[str, int]]:
    w, h = index["width"], index["height"]
    has_ann = index["has_annotations"]
    empty = ~has_ann if cfg.filter_empty_gt else np.zeros_like(has_ann)
    small = np.minimum(w, h) < cfg.min_size
    keep = ~empty & ~small
    stats = {
        "images": int(len(w)), "kept": int(keep.sum()), "dropped_no_annotations": int(empty.sum()),
        "dropped_small": int((small & ~empty).sum()),
        "crowd_or_skipped_only": int((keep & (index["num_train_instances"] == 0)).sum()),
        "more_than_max_instances": int((keep & (index["num_train_instances"] > cfg.max_instances)).sum()),
    }
    canvases = cfg.resolved_canvases()
    buckets = assign_buckets(index["decoded_width"], index["decoded_height"], cfg.img_scale, canvases,
                             cfg.size_divisor)
    bad = keep & (buckets < 0)
    if bad.any():
        ids = index["image_id"][bad][:5]
        raise ValueError(f"{int(bad.sum())} training images fit no canvas of {canvases} at img_scale "
                         f"{cfg.img_scale} (e.g. ids {ids.tolist()}); add a larger canvas")
    local_bs = cfg.global_batch_size // process_count
    plans = []
    for b, canvas in enumerate(canvases):
        ids = index["image_id"][keep & (buckets == b)]
        per_host = math.ceil(len(ids) / process_count)
        steps = math.ceil(per_host / local_bs) if len(ids) else 0
        plans.append(BucketPlan(canvas, int(len(ids)), _deal(ids, process_index, process_count), steps))
    return plans, stats


def plan_eval(cfg: DataConfig, index: dict[str, np.ndarray], process_index: int, process_count: int,
              local_bs: int) -> list[BucketPlan]:
    canvases = cfg.resolved_canvases()
    buckets = assign_buckets(index["decoded_width"], index["decoded_height"], cfg.img_scale, canvases,
                             cfg.size_divisor)
    if (buckets < 0).any():
        ids = index["image_id"][buckets < 0][:5]
        raise ValueError(f"{int((buckets < 0).sum())} eval images fit no canvas of {canvases} "
                         f"(e.g. ids {ids.tolist()})")
    plans = []
    for b, canvas in enumerate(canvases):
        ids = np.sort(index["image_id"][buckets == b])
        mine = ids[process_index::process_count]  # no borrowing: each image exactly once
        steps = math.ceil(math.ceil(len(ids) / process_count) / local_bs) if len(ids) else 0
        plans.append(BucketPlan(canvas, int(len(ids)), mine, steps))
    return plans


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainData:
    """Host-local training batches plus what a trainer needs to know about them."""
    dataset: tf.data.Dataset      # dicts of host-local batches (leading dim local_batch_size)
    buckets: list[BucketPlan]
    steps_per_epoch: int
    local_batch_size: int
    process_index: int
    process_count: int
    stats: dict[str, int]
    source: sources_lib.Source

    def numpy_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Host-local numpy batches (``gt_truncated`` popped and logged)."""
        counter = _TruncationLog()
        for b in self.dataset.as_numpy_iterator():
            yield counter(b)

    def global_batches(self, mesh, axis: str = "data") -> "GlobalBatches":
        return GlobalBatches(self.dataset, mesh, axis=axis)


@dataclasses.dataclass
class EvalData:
    dataset: tf.data.Dataset
    buckets: list[BucketPlan]
    num_steps: int
    local_batch_size: int
    num_images: int               # over all hosts
    process_index: int
    process_count: int
    source: sources_lib.Source

    def numpy_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return self.dataset.as_numpy_iterator()

    def global_batches(self, mesh, axis: str = "data") -> "GlobalBatches":
        return GlobalBatches(self.dataset, mesh, axis=axis)


def _open(cfg: DataConfig, source):
    return source if source is not None else sources_lib.open_source(cfg.data_dir, cfg.dataset)


def _check_masks(cfg: DataConfig, source) -> None:
    if cfg.with_masks and not source.with_masks:
        raise ValueError(f"with_masks=True but {source.name} has no masks (built with --no_masks, or "
                         "tfds coco/2017, which is box-only)")


def make_train_dataset(cfg: DataConfig, *, process_index: int | None = None,
                       process_count: int | None = None, num_epochs: int | None = None,
                       source: sources_lib.Source | None = None) -> TrainData:
    """Training batches of this process: ``num_epochs`` epochs (None = forever)."""
    process_index, process_count = _processes(process_index, process_count)
    if cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} not divisible by {process_count} "
                         "processes")
    source = _open(cfg, source)
    _check_masks(cfg, source)
    local_bs = cfg.global_batch_size // process_count
    index = source.index(cfg.train_split)
    plans, stats = plan_train(cfg, index, process_index, process_count)
    log.info("%s/%s train: %d of %d images (dropped %d without annotations, %d with min side < %d; "
             "%d kept with no training instance); buckets %s; %d with more than %d instances",
             source.name, cfg.train_split, stats["kept"], stats["images"], stats["dropped_no_annotations"],
             stats["dropped_small"], cfg.min_size, stats["crowd_or_skipped_only"],
             [(p.canvas, p.num_images, p.steps_per_epoch) for p in plans],
             stats["more_than_max_instances"], cfg.max_instances)
    active = [b for b, p in enumerate(plans) if p.steps_per_epoch > 0]
    if not active:
        raise ValueError(f"{source.name}/{cfg.train_split}: no training image left")
    all_local = np.concatenate([plans[b].local_ids for b in active])
    all_bucket = np.concatenate([np.full(len(plans[b].local_ids), b) for b in active])
    # An image borrowed by a host (tiny bucket) is still in one bucket only.
    table = _lookup_table(all_local, all_bucket)

    streams = []
    for b in active:
        p = plans[b]
        recs = source.records(cfg.train_split, shuffle_files=cfg.shuffle,
                              seed=_seed(cfg.seed, 1, b, process_index))
        recs = recs.filter(lambda e, b=b: tf.equal(table.lookup(e["image_id"]), b))
        if cfg.shuffle:
            recs = recs.shuffle(max(1, min(cfg.shuffle_buffer, len(p.local_ids))),
                                seed=_seed(cfg.seed, 2, b, process_index), reshuffle_each_iteration=True)
        recs = recs.repeat().enumerate()
        seed_b = _seed(cfg.seed, 3, b, process_index)
        recs = recs.map(lambda i, e, canvas=p.canvas, s=seed_b: train_transform(i, e, canvas=canvas, cfg=cfg,
                                                                               seed=s),
                        num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
        streams.append(recs.batch(local_bs, drop_remainder=True))

    steps = np.asarray([plans[b].steps_per_epoch for b in active], np.int64)
    base = tf.constant(np.repeat(np.arange(len(active), dtype=np.int64), steps))
    sched_seed = _seed(cfg.seed, 4)  # the same on every host

    def epoch_schedule(epoch):
        if not cfg.shuffle:
            return tf.data.Dataset.from_tensor_slices(base)
        u = tf.random.stateless_uniform(tf.shape(base), seed=tf.stack([tf.constant(sched_seed, tf.int64),
                                                                       epoch]))
        return tf.data.Dataset.from_tensor_slices(tf.gather(base, tf.argsort(u)))

    epochs = tf.data.Dataset.range(num_epochs) if num_epochs is not None else tf.data.Dataset.counter()
    schedule = epochs.flat_map(epoch_schedule)
    ds = tf.data.Dataset.choose_from_datasets(streams, schedule)
    ds = ds.prefetch(cfg.prefetch).with_options(_options(cfg))
    return TrainData(dataset=ds, buckets=plans, steps_per_epoch=int(steps.sum()), local_batch_size=local_bs,
                     process_index=process_index, process_count=process_count, stats=stats, source=source)


def make_eval_dataset(cfg: DataConfig, *, process_index: int | None = None, process_count: int | None = None,
                      mode: str = "bucket", source: sources_lib.Source | None = None,
                      max_images: int | None = None) -> EvalData:
    """Every eval image exactly once over all hosts (test pipeline: no flip, no filtering).

    mode 'bucket': batches of ``eval_global_batch_size // process_count`` on the bucket canvases; the
      last batch of each bucket is completed with invalid entries (``valid`` False, ``image_id`` -1) and
      every host runs the same number of steps with the same canvas per step.
    mode 'per_image': host-local batches of one image padded to its own pad_shape (the original's test
      shapes, parity_spec §14.1); shapes vary, so these are for local (not global-array) evaluation.
    max_images: only the first N images by id (a quick look at a subset).
    """
    process_index, process_count = _processes(process_index, process_count)
    source = _open(cfg, source)
    index = source.index(cfg.eval_split)
    if max_images:
        first = np.isin(index["image_id"], np.sort(index["image_id"])[:int(max_images)])
        index = {k: v[first] for k, v in index.items()}
    if mode == "per_image":
        mine = np.sort(index["image_id"])[process_index::process_count]
        table = _lookup_table(mine, np.zeros(len(mine)))
        recs = source.records(cfg.eval_split).filter(lambda e: tf.equal(table.lookup(e["image_id"]), 0))
        ds = recs.map(lambda e: eval_transform(e, canvas=None, cfg=cfg),
                      num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
        ds = ds.batch(1).prefetch(cfg.prefetch).with_options(_options(cfg))
        return EvalData(ds, [], len(mine), 1, int(len(index["image_id"])), process_index, process_count,
                        source)
    if mode != "bucket":
        raise ValueError(f"unknown eval mode {mode!r}")
    if cfg.eval_global_batch_size % process_count:
        raise ValueError(f"eval_global_batch_size {cfg.eval_global_batch_size} not divisible by "
                         f"{process_count} processes")
    local_bs = cfg.eval_global_batch_size // process_count
    plans = plan_eval(cfg, index, process_index, process_count, local_bs)
    all_local = np.concatenate([p.local_ids for p in plans])
    all_bucket = np.concatenate([np.full(len(p.local_ids), b) for b, p in enumerate(plans)])
    table = _lookup_table(all_local, all_bucket)
    ds = None
    for b, p in enumerate(plans):
        if p.steps_per_epoch == 0:
            continue
        recs = source.records(cfg.eval_split).filter(
            lambda e, b=b: tf.equal(table.lookup(e["image_id"]), b))
        recs = recs.map(lambda e, canvas=p.canvas: eval_transform(e, canvas=canvas, cfg=cfg),
                        num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
        n_pad = p.steps_per_epoch * local_bs - len(p.local_ids)
        if n_pad:
            recs = recs.concatenate(tf.data.Dataset.from_tensors(_dummy_eval(p.canvas)).repeat(n_pad))
        recs = recs.batch(local_bs, drop_remainder=True)
        ds = recs if ds is None else ds.concatenate(recs)
    if ds is None:
        raise ValueError(f"{source.name}/{cfg.eval_split}: no images")
    ds = ds.prefetch(cfg.prefetch).with_options(_options(cfg))
    return EvalData(ds, plans, int(sum(p.steps_per_epoch for p in plans)), local_bs,
                    int(len(index["image_id"])), process_index, process_count, source)


# ----------------------------------------------------------------------------------------------------
# Global arrays
# ----------------------------------------------------------------------------------------------------
class _TruncationLog:
    """Pops ``gt_truncated`` from a batch, counts and logs it (never fails)."""

    def __init__(self):
        self.images = 0
        self.instances = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = batch.pop("gt_truncated", None)
        if t is not None and np.any(t > 0):
            ids = batch["image_id"][t > 0].tolist()
            self.images += int(np.sum(t > 0))
            self.instances += int(np.sum(t))
            log.warning("images %s have more GT instances than max_instances: %s dropped (so far %d "
                        "instances in %d images)", ids, t[t > 0].tolist(), self.instances, self.images)
        return batch


class GlobalBatches:
    """Iterator of global ``jax.Array`` batches sharded on ``axis`` of ``mesh`` (leading dim).

    Each process feeds its host-local batch; ``jax.make_array_from_process_local_data`` assembles the
    global array (global batch = local batch x processes along the data axis).
    """

    def __init__(self, dataset: tf.data.Dataset, mesh, axis: str = "data"):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec
        self._jax = jax
        self._it = dataset.as_numpy_iterator()
        self.sharding = NamedSharding(mesh, PartitionSpec(axis))
        self.truncation = _TruncationLog()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        local = self.truncation(next(self._it))
        mk = self._jax.make_array_from_process_local_data
        return {k: mk(self.sharding, v) for k, v in local.items()}
