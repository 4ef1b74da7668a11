"""The train and evaluation loops: one readable file.

``Trainer(config, workdir)`` builds the detector, the optimizer, the mesh and the data; ``train()`` runs until
``schedule.epochs`` (or ``train.max_steps``), checkpointing and evaluating on the way; ``evaluate()`` runs
COCO evaluation of the current (or a given) state. Semantics follow the original 8-GPU x 2-image runs:
BatchNorm statistics and the loss normaliser are computed over groups of ``train.stats_group_size`` images,
and the update uses the mean of the groups' losses (DDP's gradient average), whatever our device count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lit_jax.benchmarking.timing import CompileWatch
from lit_jax.models.registry import build_detector
from lit_jax.train import sharding
from lit_jax.train.optim import build_optimizer, step_schedule_with_warmup

log = logging.getLogger(__name__)



class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the checkpoint kept."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (replicated over the mesh)."""

    step: jnp.ndarray  # int32 (): optimizer updates done
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jnp.ndarray  # uint32 (2,): raw PRNG key data (checkpoint-friendly)


def _model_section(config: ml_collections.ConfigDict) -> dict:
    """The model config with what the trainer decides filled in: the train-time statistics grouping and, for
    Mask R-CNN, the scale of the pipeline's mask crops ({0, 1} or 255 levels)."""
    model = config.model.to_dict()
    group = int(config.train.get("stats_group_size", 0) or 0) or None
    model.setdefault("backbone_args", {})
    model["backbone_args"] = dict(model["backbone_args"], bn_group_size=group)
    model["train_test"] = dict(model.get("train_test", {}), loss_group_size=group)
    if model.get("type") == "mask_rcnn":
        if not config.data.get("with_masks", False):
            raise ValueError("model.type='mask_rcnn' trains on mask targets: set data.with_masks=True")
        binary = bool(config.data.get("mask_binary", True))
        model["train_test"]["gt_mask_scale"] = 1.0 if binary else 1.0 / 255.0
    return model


def load_pretrained_backbone(path: str, backbone) -> dict:
    """Converted weights (a folder from convert_weights.py) or a .pth, as backbone variables."""
    from lit_jax.convert import load_pth, load_variables

    if os.path.isdir(path):
        return load_variables(path)
    if os.path.isfile(path):
        return load_pth(path, backbone)
    raise FileNotFoundError(f"model.pretrained={path!r}: no such folder (convert_weights.py --dst) or .pth file")


class Trainer:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        from lit_jax.data.config import DataConfig

        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.mesh = sharding.make_mesh()
        self.detector = build_detector(_model_section(config))
        self.data_cfg = DataConfig.from_dict(config.data)
        self.is_main = jax.process_index() == 0
        self.last_eval_speed = None  # after evaluate(): images, seconds, shapes, compiles, compile_seconds, mode
        group = config.train.get("stats_group_size", 0)
        n_dev = jax.device_count()
        if group and (self.data_cfg.global_batch_size // n_dev) % group and n_dev > 1:
            raise ValueError(f"per-device batch {self.data_cfg.global_batch_size // n_dev} is not a multiple of "
                             f"train.stats_group_size {group}")
        if self.data_cfg.global_batch_size % n_dev:
            raise ValueError(f"data.global_batch_size {self.data_cfg.global_batch_size} is not divisible by "
                             f"{n_dev} devices")

    # -- state ---------------------------------------------------------------------------------------------
    def learning_rate(self, steps_per_epoch: int):
        opt, sched = self.config.optimizer, self.config.schedule
        lr = float(opt.lr)
        if self.config.train.get("scale_lr", False):
            ref = float(self.config.train.reference_batch)
            lr *= self.data_cfg.global_batch_size / ref
            log.info("lr scaled linearly: %g x %d / %d = %g", opt.lr, self.data_cfg.global_batch_size, ref, lr)
        else:
            log.info("lr %g (not scaled with the batch, as the original)", lr)
        return step_schedule_with_warmup(
            lr, steps_per_epoch=steps_per_epoch, milestones=tuple(sched.milestones), gamma=float(sched.gamma),
            warmup_iters=int(sched.warmup_iters), warmup_ratio=float(sched.warmup_ratio))

    def init_state(self, tx: optax.GradientTransformation, *, load_weights: bool = True) -> TrainState:
        """The step-0 state: the detector's initialisation, then (``load_weights``) ``model.load_from`` (a whole
        detector) or ``model.pretrained`` (a backbone). A run that resumes passes False: its checkpoint
        replaces everything anyway."""
        cfg = self.config
        canvas = self.data_cfg.resolved_canvases()[0]
        key = jax.random.PRNGKey(int(cfg.train.seed))
        init_key, train_key = jax.random.split(key)
        variables = jax.jit(lambda k: self.detector.init(k, canvas))(init_key)
        params, stats = variables["params"], variables.get("batch_stats", {})
        pretrained = cfg.model.get("pretrained", "") if load_weights else ""
        load_from = cfg.model.get("load_from", "") if load_weights else ""
        if load_from:
            from lit_jax.inference.detector import inference_model_section
            from lit_jax.train.finetune import load_from as load_detector_from

            fresh = {"params": params, "batch_stats": stats}
            merged, _ = load_detector_from(load_from, self.detector, inference_model_section(cfg), fresh)
            params = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), params, merged["params"])
            stats = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), stats, merged.get("batch_stats", {}))
        if pretrained:
            loaded = load_pretrained_backbone(pretrained, self.detector.module.backbone)
            params = _replace_subtree(params, "backbone", loaded["params"], pretrained)
            stats = _replace_subtree(stats, "backbone", loaded.get("batch_stats", {}), pretrained)
            log.info("backbone initialised from %s", pretrained)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=tx.init(params), rng=jax.random.key_data(train_key))
        return jax.device_put(state, sharding.replicated(self.mesh))

    def frozen_parameters(self) -> tuple:
        """Parameter path prefixes the optimizer keeps fixed: the backbone's frozen stages."""
        backbone = self.detector.module.backbone
        return tuple(f"backbone/{p}" for p in backbone.frozen_parameters())

    # -- steps ---------------------------------------------------------------------------------------------
    def make_train_step(self, tx, schedule):
        return build_train_step(self.detector, tx, schedule, self.mesh)

    def make_predict(self):
        det = self.detector

        def predict(variables, images, img_shape, scale_factor):
            return det.predict(variables, images, {"img_shape": img_shape, "scale_factor": scale_factor})

        return jax.jit(predict)

    # -- loops ---------------------------------------------------------------------------------------------
    def train(self, final_eval: bool = True) -> TrainState:
        from lit_jax.config import validate_config
        from lit_jax.data.pipeline import make_train_dataset
        from lit_jax.train.checkpoint import CheckpointStore
        from lit_jax.train.metrics import MetricLogger

        cfg = self.config
        validate_config(cfg)
        os.makedirs(self.workdir, exist_ok=True)
        self._write_config()
        data = make_train_dataset(self.data_cfg)
        check_num_classes(data.source, self.detector.cfg.num_classes)
        classes = (list(data.source.category_names), [int(i) for i in data.source.category_ids])
        steps_per_epoch = data.steps_per_epoch
        total = int(cfg.train.get("max_steps", 0) or 0) or steps_per_epoch * int(cfg.schedule.epochs)
        schedule = self.learning_rate(steps_per_epoch)
        tx = build_optimizer(cfg.optimizer.to_dict(), schedule, frozen=self.frozen_parameters())
        store = CheckpointStore(os.path.join(self.workdir, "checkpoints"),
                                keep=int(cfg.train.keep_checkpoints), async_save=True)
        resume = store.latest_step()
        state = self.init_state(tx, load_weights=resume is None)
        ckpt_every = int(cfg.train.checkpoint_every_steps)
        last_good = None  # the newest checkpoint known to be readable: the one restored, then each one saved
        iterator = DataIterator(data, self.mesh, os.path.join(self.workdir, "data_state"),
                                prefetch=int(cfg.train.get("prefetch", 2)), start_step=resume or 0,
                                checkpoint_every=ckpt_every, total_steps=total)
        if resume is not None:
            # After a fallback the unreadable newer steps are renamed aside, so this run can save them again.
            step, state, extra = store.restore(state, set_aside_unreadable=True)
            last_good = step
            iterator.restore(step)
            log.info("resumed from step %d (%s)", step, extra.get("time", ""))
        start = int(state.step)
        train_step = self.make_train_step(tx, schedule)
        eval_every = int(cfg.train.get("eval_every_epochs", 1) or 0) * steps_per_epoch
        logger = MetricLogger(self.workdir, total=total, initial=start, enabled=self.is_main,
                              every=int(cfg.train.log_every_steps),
                              images_per_step=self.data_cfg.global_batch_size)
        log.info("training %d steps (%d per epoch) from step %d on %d devices, %d processes", total,
                 steps_per_epoch, start, jax.device_count(), jax.process_count())
        pending = None  # (step, metrics) of the previous step, checked one step late to keep dispatch async
        try:
            for step in range(start, total):
                store.poll()  # a background save that failed stops training here, naming its step
                batch = next(iterator)
                state, metrics = train_step(state, {k: batch[k] for k in self.detector.train_batch_keys})
                if pending is not None:
                    self._check_finite(*pending, last_good)
                    logger.log(pending[0], pending[1])
                pending = (step + 1, metrics)
                done = step + 1
                if done % ckpt_every == 0 or done == total:
                    self._check_finite(*pending, last_good)
                    iterator.save(done)
                    store.save(done, state, {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": done / steps_per_epoch,
                                             "class_names": classes[0], "category_ids": classes[1]})
                    last_good = done
                if eval_every and done % eval_every == 0 and done != total:
                    store.wait()
                    self._log_eval(self.evaluate(state), done, logger)
            if pending is not None:
                self._check_finite(*pending, last_good)
                logger.log(pending[0], pending[1])
        finally:
            try:
                iterator.close()
            finally:
                try:
                    store.close()  # waits for the last save; raises CheckpointSaveError if it failed
                finally:
                    logger.close()
        if final_eval:
            show_dir = os.path.join(self.workdir, "predictions")
            show_num = int(cfg.eval.get("show_num", 0) or 0)
            self._log_eval(self.evaluate(state, show_dir=show_dir, show_num=show_num), total, None)
            if show_num and self.is_main:
                print(f"predictions of {show_num} validation images drawn in {show_dir}", flush=True)
        return state

    def _check_finite(self, step: int, metrics: dict, last_good: Optional[int]) -> None:
        """Stops on a non-finite loss, gradient or update (the state after ``step`` is then not trusted)."""
        loss = float(metrics["loss"])
        if not all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm", "update_norm")):
            kept = f"step {last_good}" if last_good is not None else "none (no checkpoint was written yet)"
            terms = ", ".join(f"{k} {float(v)}" for k, v in sorted(metrics.items())
                              if k.startswith("loss_") or k.endswith("_norm"))
            raise NonFiniteLossError(
                f"non-finite loss {loss} at step {step} ({terms}); stopped without saving; last good checkpoint: "
                f"{kept} in {os.path.join(self.workdir, 'checkpoints')}")

    def _log_eval(self, stats: dict, step: int, logger) -> None:
        if not self.is_main or not stats:
            return
        line = ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if isinstance(v, float))
        log.info("eval at step %d: %s", step, line)
        print(f"eval at step {step}: {line}", flush=True)
        with open(os.path.join(self.workdir, "eval_results.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **stats}) + "\n")
        if logger is not None:
            scalars = {f"eval/{k}": v for k, v in stats.items() if isinstance(v, float)}
            for k, per_class in stats.items():  # eval.classwise: {iou}_AP_per_class -> eval/{iou}_AP/<class>
                if isinstance(per_class, dict):
                    scalars.update({f"eval/{k.replace('_per_class', '')}/{name}": v for name, v in per_class.items()})
            logger.scalars(step, scalars)

    def evaluate(self, state_or_variables, *, results_path: Optional[str] = None, classwise: Optional[bool] = None,
                 max_images: Optional[int] = None, format_only: bool = False, show_dir: Optional[str] = None,
                 show_num: int = 0) -> dict:
        """COCO evaluation on ``data.eval_split`` (bbox; bbox and segm for Mask R-CNN); returns mmdet-style stats
        (process 0) or {}.

        results_path: also write the COCO results JSON there. classwise: per-class AP too (default
        ``eval.classwise``). max_images: the first N images by id only. format_only: write the results JSON and
        evaluate nothing (no annotations needed, e.g. test-dev). show_dir / show_num: draw the predictions of
        the first ``show_num`` images there."""
        from lit_jax.data.pipeline import make_eval_dataset
        from lit_jax.evaluation.coco_eval import CocoEvaluator, detections_to_coco

        cfg = self.config
        if isinstance(state_or_variables, TrainState):
            variables = {"params": state_or_variables.params, "batch_stats": state_or_variables.batch_stats}
        else:
            variables = state_or_variables
        classwise = bool(cfg.eval.get("classwise", False)) if classwise is None else classwise
        mode = cfg.eval.get("mode", "per_image")
        data = make_eval_dataset(self.data_cfg, mode=mode, max_images=max_images)
        label_to_cat = list(data.source.category_ids)
        if len(label_to_cat) != self.detector.cfg.num_classes:
            raise ValueError(f"the model predicts {self.detector.cfg.num_classes} classes but {data.source.name} has "
                             f"{len(label_to_cat)} categories; set model.num_classes or evaluate on a matching dataset")
        if format_only and not results_path:
            raise ValueError("format_only writes the results JSON only: give results_path")
        evaluator = None
        if self.is_main and not format_only:
            ann_file = cfg.eval.get("ann_file", "") or annotation_file(data.source, self.data_cfg.eval_split)
            image_ids = None
            if max_images:
                image_ids = np.sort(data.source.index(self.data_cfg.eval_split)["image_id"])[:int(max_images)]
            evaluator = CocoEvaluator(ann_file, image_ids=image_ids)
        predict = self.make_predict()
        if mode == "per_image":
            # Each image at its own padded size on this process's first device (the original's test shapes).
            variables = jax.device_put(variables, jax.local_devices()[0])
            batches = data.numpy_batches()
            gather = np.asarray
        else:
            variables = jax.device_put(variables, sharding.replicated(self.mesh))
            batches = data.global_batches(self.mesh)
            gather = sharding.to_host
        with_masks = self.detector.with_masks
        # Masks are pasted and RLE-encoded where the detections are at hand: per image on each process, or
        # (bucket mode, where every process holds the gathered batch) on process 0 only.
        encode_here = mode == "per_image" or self.is_main
        collected, shapes, images, start = [], set(), 0, time.perf_counter()
        with CompileWatch() as watch:
            for batch in batches:
                shapes.add(tuple(batch["images"].shape))  # one compilation of predict per distinct shape
                out = predict(variables, batch["images"], batch["img_shape"], batch["scale_factor"])
                c = {"image_id": gather(batch["image_id"]),
                     "valid": gather(batch["valid"]) if "valid" in batch else None,
                     "boxes": gather(out.boxes), "scores": gather(out.scores), "labels": gather(out.labels),
                     "det_valid": gather(out.valid)}
                if with_masks and encode_here:
                    c["masks"] = self._encode_masks(gather(out.mask_probs), gather(out.mask_boxes),
                                                    gather(out.mask_valid), c["det_valid"], gather(batch["ori_shape"]))
                collected.append(c)
                images += int(np.sum(c["valid"])) if c["valid"] is not None else len(c["image_id"])
        seconds = time.perf_counter() - start
        # Compilations counted as they happen (jax.monitoring): one per distinct shape when nothing else in the loop
        # compiles. Without them: the loop's time less the tracing, lowering and XLA compile time it contained.
        self.last_eval_speed = {"mode": mode, "images": images, "seconds": seconds, "shapes": len(shapes),
                                "compiles": watch.count, "compile_seconds": watch.seconds}
        log.info("evaluated %d images (%s mode) in %.1f s: %.2f images/s, %d compiled shapes, %d compilations "
                 "taking %.1f s (%.2f images/s without them)", images, mode, seconds, images / max(seconds, 1e-9),
                 len(shapes), watch.count, watch.seconds, images / max(seconds - watch.seconds, 1e-9))
        if mode == "per_image" and jax.process_count() > 1:
            collected = _allgather_pickled(collected)
        if not self.is_main:
            return {}
        results = []
        for c in collected:
            keep = c["valid"].astype(bool) if c["valid"] is not None else np.ones(len(c["image_id"]), bool)
            masks = [m for m, k in zip(c["masks"], keep) if k] if with_masks else None
            results.extend(detections_to_coco(c["image_id"][keep], c["boxes"][keep], c["scores"][keep],
                                              c["labels"][keep], c["det_valid"][keep], label_to_cat, masks=masks))
        if results_path:
            _write_json(results_path, results)
        if show_dir and show_num:
            from lit_jax.evaluation.show import draw_results_on_split

            drawn = draw_results_on_split(data.source, self.data_cfg.eval_split, results, show_dir, num=show_num,
                                          class_names=data.source.category_names, category_ids=label_to_cat,
                                          score_thr=float(cfg.eval.get("show_score_thr", 0.3)))
            log.info("predictions of %d images drawn in %s", len(drawn), show_dir)
        if evaluator is None:
            return {}
        evaluator.extend(results)
        return evaluator.evaluate(iou_types=("bbox", "segm") if with_masks else ("bbox",), classwise=classwise)

    def _encode_masks(self, mask_probs, mask_boxes, mask_valid, det_valid, ori_shape) -> list:
        """Per image of a batch: the RLEs of its valid detections' masks, pasted at the original size."""
        from lit_jax.evaluation.coco_eval import encode_masks

        out = []
        for i in range(len(det_valid)):
            slots = np.flatnonzero(det_valid[i])
            h0, w0 = (int(v) for v in ori_shape[i][:2])
            if not len(slots) or h0 <= 0 or w0 <= 0:  # no detections, or an eval padding image
                out.append([])
                continue
            masks = self.detector.paste(mask_probs[i], mask_boxes[i], (h0, w0), mask_valid[i], bucket=128)
            out.append(encode_masks(masks[slots]))
        return out

    def load_variables(self, *, checkpoint: Optional[str] = None, pth: Optional[str] = None) -> dict:
        """Detector variables from a released mmdet ``.pth``, a converted folder, a workdir or a checkpoint
        (see :func:`lit_jax.inference.weights.load_weights`; only the model variables are read)."""
        from lit_jax.inference.weights import load_weights

        if not (checkpoint or pth):
            raise ValueError("give a checkpoint (workdir, checkpoint folder, converted folder) or a .pth")
        return load_weights(pth or checkpoint, self.detector).variables

    def _write_config(self) -> None:
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(self.config.to_json_best_effort(indent=2, sort_keys=True))


def build_train_step(detector, tx: optax.GradientTransformation, schedule, mesh):
    """The jitted train step ``(state, batch) -> (state, metrics)``: state replicated, batch sharded on 'data'.

    The loss is the detector's (per-group normalisation, BatchNorm per group); the gradient of the mean over
    groups is DDP's average of per-GPU gradients. The state buffers are donated.
    """

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            return detector.loss({"params": params, "batch_stats": state.batch_stats}, batch, rng)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v for k, v in aux.items() if k.startswith("loss_")}  # the detector's loss terms
        metrics.update({
            "loss": loss, "num_pos": aux["num_pos"].astype(jnp.float32), "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates), "lr": schedule(state.step),
        })
        new = state.replace(step=state.step + 1, params=params, batch_stats=aux["batch_stats"], opt_state=opt_state)
        return new, metrics

    rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
    return jax.jit(train_step, in_shardings=(rep, dat), out_shardings=(rep, rep), donate_argnums=(0,))


def _replace_subtree(tree: dict, key: str, new: dict, source: str) -> dict:
    """``tree[key] = new`` after checking that the structure and shapes agree (naming any difference)."""
    old = tree[key]
    flat_old = flax.traverse_util.flatten_dict(flax.core.unfreeze(old), sep="/")
    flat_new = flax.traverse_util.flatten_dict(dict(new), sep="/")
    missing = sorted(set(flat_old) - set(flat_new))
    extra = sorted(set(flat_new) - set(flat_old))
    shapes = sorted(k for k in set(flat_old) & set(flat_new) if tuple(flat_old[k].shape) != tuple(np.shape(flat_new[k])))
    if missing or extra or shapes:
        raise ValueError(f"{source} does not fit the backbone: missing {missing}, unexpected {extra}, "
                         f"wrong shape {shapes}")
    out = dict(tree)
    out[key] = jax.tree_util.tree_map(lambda a, b: jnp.asarray(b, a.dtype), old, flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): v for k, v in flat_new.items()}))
    return out


def _write_json(path: str, obj) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def check_num_classes(source, num_classes: int) -> None:
    """Raises ValueError unless the dataset has exactly ``model.num_classes`` categories.

    Labels themselves need no pass over the data: coco_instances builds each label as the index of its
    category_id in the same category list (annotations of unknown categories are dropped at prepare time) and
    tfds coco stores them as a ClassLabel over its names, so every label is in ``[0, source.num_classes)``.
    """
    if source.num_classes != num_classes:
        raise ValueError(f"dataset {source.name} has {source.num_classes} categories but model.num_classes is "
                         f"{num_classes}: set --config.model.num_classes={source.num_classes} (labels >= "
                         f"{num_classes} would silently be trained as background)")


def annotation_file(source, split: str) -> str:
    """The COCO json a prepared split was built from (recorded in the dataset's metadata)."""
    md = getattr(getattr(source, "builder", None), "info", None)
    md = md.metadata if md is not None else None
    if not md or "source_dir" not in md or split not in md.get("splits", {}):
        raise ValueError(f"{source.name}: no annotation file recorded for split {split!r}; set eval.ann_file")
    path = os.path.join(md["source_dir"], md["splits"][split]["ann_file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} (the annotations {source.name}/{split} was built from) is missing; "
                                "set eval.ann_file")
    return path


def _allgather_pickled(items: list) -> list:
    """Host-local lists of numpy dicts gathered on every process (per-image evaluation across hosts)."""
    import pickle

    from jax.experimental import multihost_utils

    blob = np.frombuffer(pickle.dumps(items), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    allb = multihost_utils.process_allgather(padded)
    out = []
    for i, n in enumerate(np.asarray(sizes).reshape(-1)):
        out.extend(pickle.loads(allb[i, : int(n)].tobytes()))  # our own bytes from our own processes
    return out


class DataIterator:
    """Global training batches with a resumable position, prefetched to the devices.

    The tf.data iterator state of each process is saved with ``tf.train.Checkpoint`` under
    ``directory/step_N/process_K`` next to each model checkpoint, so a resumed run continues with exactly the
    batches an uninterrupted run would have seen.

    With ``prefetch > 0`` a background thread reads the next batches and puts them on the devices
    (``jax.make_array_from_process_local_data``) while the current step runs, keeping up to ``prefetch`` ready.
    It never reads past the next checkpoint step (``checkpoint_steps``), so when the trainer saves, every batch
    read has been consumed and the saved tf.data position is exact; it resumes after the save.
    """

    def __init__(self, data, mesh, directory: str, *, prefetch: int = 0, start_step: int = 0,
                 checkpoint_every: int = 0, total_steps: int = 0):
        import tensorflow as tf

        self._tf = tf
        self.data = data
        self.directory = directory
        self.sharding = sharding.data_sharded(mesh)
        self._it = iter(data.dataset)
        self._ckpt = tf.train.Checkpoint(iterator=self._it)
        self._truncation = None
        self._prefetch = int(prefetch)
        self._every = int(checkpoint_every)
        self._total = int(total_steps)
        self._thread = None
        self._consumed = self._produced = int(start_step)

    # -- reading -------------------------------------------------------------------------------------------
    def _read(self) -> dict:
        from lit_jax.data.pipeline import _TruncationLog

        if self._truncation is None:
            self._truncation = _TruncationLog()
        local = self._truncation({k: v.numpy() for k, v in next(self._it).items()})
        return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in local.items()}

    def _next_boundary(self, step: int) -> int:
        """The first checkpoint step after ``step`` (reading stops there until it is saved)."""
        ends = [self._total] if self._total else []
        if self._every:
            ends.append((step // self._every + 1) * self._every)
        return min(ends) if ends else step + (1 << 30)

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._cond = threading.Condition()
        self._allowed = self._next_boundary(self._consumed)
        self._closed = False
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        while True:
            with self._cond:
                while self._produced >= self._allowed and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                item = self._read()
            except BaseException as err:  # StopIteration or a data error: re-raised in the training thread
                self._queue.put(err)
                return
            self._produced += 1
            while True:  # a bounded put that notices close()
                try:
                    self._queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    if self._closed:
                        return

    def __next__(self) -> dict:
        if not self._prefetch:
            self._consumed += 1
            return self._read()
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._consumed += 1
        return item

    # -- position ------------------------------------------------------------------------------------------
    def _path(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step}", f"process_{jax.process_index()}")

    def save(self, step: int) -> None:
        if self._thread is not None and self._produced != self._consumed:
            raise RuntimeError(f"data position at step {step}: {self._produced} batches read but {self._consumed} "
                               "consumed (saves must happen at the checkpoint steps the iterator was given)")
        path = self._path(step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._ckpt.write(path)
        # Keep the positions of the last few checkpoints only.
        steps = sorted(int(d.split("_")[1]) for d in os.listdir(self.directory) if d.startswith("step_"))
        for old in steps[:-5]:
            shutil.rmtree(os.path.join(self.directory, f"step_{old}"), ignore_errors=True)
        if self._thread is not None:
            with self._cond:
                self._allowed = self._next_boundary(step)
                self._cond.notify_all()

    def restore(self, step: int) -> None:
        if self._thread is not None:
            raise RuntimeError("restore the data position before reading batches")
        self._consumed = self._produced = step
        path = self._path(step)
        if os.path.exists(path + ".index"):
            self._ckpt.read(path).assert_consumed()
            log.info("data position restored from %s", path)
            return
        log.warning("no saved data position for step %d (%s): skipping %d batches to reach it", step, path, step)
        for _ in range(step):
            next(self._it)

    def close(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(timeout=5)
