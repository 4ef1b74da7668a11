"""A trained detector as a callable: images in, plain-numpy detections (and masks) out.

    det = load_detector("configs/mask_rcnn_lit_ti_fpn_1x_coco.py", "mask_rcnn_lit_ti_1x.pth")
    results = det(["a.jpg", "b.png"])          # or one path, a folder, a glob, an (H, W, 3) uint8 RGB array
    r = results[0]; r.boxes, r.scores, r.labels, r.names, r.masks; r.to_coco(image_id)

Images go through the original's test pipeline (:func:`lit_jax.data.image.prepare_image`). Canvases:
``'per_image'`` (default) pads each image to its own multiple of 32, as the original tests, and compiles once
per padded shape; ``'bucket'`` pads to the training canvases (``data.canvases``, or landscape/portrait from
``data.img_scale``), so a whole folder costs at most one compile per canvas. The padded area is not inert for
LIT (its later stages attend globally), so the two modes can differ slightly (docs/inference.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, Optional, Sequence, Union

import jax
import numpy as np

from lit_jax.data.image import MEAN_RGB, STD_RGB, PreparedImage, assign_buckets, default_canvases, prepare_image
from lit_jax.inference import inputs as inputs_lib
from lit_jax.inference.weights import load_weights, resolve_class_names

log = logging.getLogger(__name__)

CANVAS_MODES = ("per_image", "bucket")


@dataclasses.dataclass
class Result:
    """Detections of one image, plain numpy, in original-image pixels, by descending score.

    boxes ``(N, 4)`` float32 (x1, y1, x2, y2); scores ``(N,)`` float32; labels ``(N,)`` int64 in
    ``[0, num_classes)``; names ``(N,)`` str; masks ``(N, H, W)`` bool at the image's size, or None (a detector
    without masks, or ``with_masks=False``); image_shape (H, W); source: the file name or ``array[i]``."""
    source: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: np.ndarray
    masks: Optional[np.ndarray]
    image_shape: tuple
    category_ids: Sequence[int] = dataclasses.field(repr=False, default=())

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> "Result":
        """The detections where ``keep`` (bool ``(N,)`` or indices) holds."""
        return dataclasses.replace(self, boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep],
                                   names=self.names[keep], masks=None if self.masks is None else self.masks[keep])

    def to_coco(self, image_id: int) -> list:
        """COCO results entries: ``{'image_id', 'bbox' (x, y, w, h), 'score', 'category_id'[, 'segmentation'
        (RLE)]}``, with the category ids the weights were trained on (COCO's for released detectors)."""
        from lit_jax.evaluation.coco_eval import detections_to_coco

        masks = None if self.masks is None else [self.masks]
        return detections_to_coco([image_id], self.boxes[None], self.scores[None], self.labels[None], None,
                                  list(self.category_ids), masks=masks)


class Detector:
    """A detector with its weights, class names and compiled prediction functions.

    Call it on inputs (see :func:`lit_jax.inference.inputs.expand`) for a list of :class:`Result`;
    :meth:`stream` yields ``(name, Result or InputError)`` so that one bad input does not stop a run.

    Attributes: model (the ``build_detector`` object), variables, class_names, category_ids, config,
    canvas, compiles (how many times the prediction function was compiled so far).
    """

    def __init__(self, model, variables: dict, config, class_names: Sequence[str], category_ids: Sequence[int], *,
                 canvas: str = "per_image", batch_size: int = 1, score_thr: Optional[float] = None,
                 with_masks: bool = True, device=None):
        if canvas not in CANVAS_MODES:
            raise ValueError(f"canvas={canvas!r}; known: {list(CANVAS_MODES)}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.config = config
        self.class_names = list(class_names)
        self.category_ids = list(category_ids)
        self.canvas = canvas
        self.batch_size = int(batch_size)
        self.score_thr = score_thr
        self.with_masks = bool(with_masks) and model.with_masks
        self.device = device or jax.local_devices()[0]
        self.variables = jax.device_put(variables, self.device)
        data = config.data
        self.img_scale = tuple(int(v) for v in data.img_scale)
        self.size_divisor = int(data.get("size_divisor", 32))
        self.mean = tuple(data.get("mean", None) or MEAN_RGB)
        self.std = tuple(data.get("std", None) or STD_RGB)
        canvases = data.get("canvases", None)
        self.canvases = (tuple(tuple(int(v) for v in c) for c in canvases) if canvases
                         else default_canvases(self.img_scale, self.size_divisor))
        self.compiles = 0
        self._predict = jax.jit(self._traced_predict)

    # -- the compiled step ---------------------------------------------------------------------------------
    def _traced_predict(self, variables, images, img_shape, scale_factor):
        self.compiles += 1  # runs once per trace, i.e. per new input shape
        return self.model.predict(variables, images, {"img_shape": img_shape, "scale_factor": scale_factor})

    def predict_batch(self, prepared: Sequence[PreparedImage]):
        """``model.predict`` on images of one padded shape, as host numpy (a DetectorOutput). The batch is
        padded to ``batch_size`` with blank images, so every batch of a shape reuses one compilation."""
        n = len(prepared)
        pad = max(self.batch_size - n, 0)
        images = np.stack([p.image for p in prepared] + [np.zeros_like(prepared[0].image)] * pad)
        img_shape = np.stack([p.img_shape for p in prepared] + [prepared[0].img_shape] * pad)
        scale = np.stack([p.scale_factor for p in prepared] + [prepared[0].scale_factor] * pad)
        out = self._predict(self.variables, jax.device_put(images, self.device), img_shape, scale)
        return jax.tree.map(lambda x: np.asarray(x)[:n], jax.device_get(out))

    # -- images -> results ---------------------------------------------------------------------------------
    def prepare(self, rgb: np.ndarray) -> PreparedImage:
        """The test pipeline on one RGB uint8 image, on this detector's canvas mode."""
        canvas = None
        if self.canvas == "bucket":
            h, w = rgb.shape[:2]
            b = int(assign_buckets([w], [h], self.img_scale, self.canvases, self.size_divisor)[0])
            if b < 0:
                raise ValueError(f"an image of {w}x{h} fits none of the canvases {self.canvases}")
            canvas = self.canvases[b]
        return prepare_image(rgb, self.img_scale, mean=self.mean, std=self.std, size_divisor=self.size_divisor,
                             canvas=canvas)

    def stream(self, inputs, *, score_thr: Optional[float] = None, with_masks: Optional[bool] = None
               ) -> Iterator[tuple]:
        """Yields ``(name, Result)`` per image in input order, or ``(name, InputError)`` for an input that cannot
        be read; up to ``batch_size`` consecutive images of one padded shape share a step."""
        thr = self.score_thr if score_thr is None else score_thr
        masks = self.with_masks if with_masks is None else (bool(with_masks) and self.model.with_masks)
        pending: list = []  # (name, prepared) of one padded shape

        def flush():
            if not pending:
                return
            out = self.predict_batch([p for _, p in pending])
            done = [(name, self._result(name, out, i, prep, masks, thr)) for i, (name, prep) in enumerate(pending)]
            pending.clear()
            yield from done

        for item in inputs_lib.expand(inputs):
            if isinstance(item, inputs_lib.InputError):
                yield from flush()
                yield item.name, item
                continue
            try:
                prepared = self.prepare(item.load())
            except inputs_lib.InputError as err:
                yield from flush()
                yield item.name, err
                continue
            except ValueError as err:  # prepare_image: an image that fits no canvas
                yield from flush()
                yield item.name, inputs_lib.InputError(f"{item.name}: {err}", item.name)
                continue
            if pending and pending[0][1].image.shape != prepared.image.shape:
                yield from flush()
            pending.append((item.name, prepared))
            if len(pending) == self.batch_size:
                yield from flush()
        yield from flush()

    def __call__(self, inputs, *, score_thr: Optional[float] = None, with_masks: Optional[bool] = None
                 ) -> list:
        """Results of every image in ``inputs``, in order; raises the InputError of the first bad input."""
        results = []
        for _, r in self.stream(inputs, score_thr=score_thr, with_masks=with_masks):
            if isinstance(r, Exception):
                raise r
            results.append(r)
        return results

    def _result(self, name: str, out, i: int, prepared: PreparedImage, with_masks: bool,
                score_thr: Optional[float]) -> Result:
        keep = np.asarray(out.valid[i], bool)
        if score_thr is not None:
            keep = keep & (np.asarray(out.scores[i]) > score_thr)  # strictly greater, as mmdet's show_result
        slots = np.flatnonzero(keep)
        labels = np.asarray(out.labels[i])[slots].astype(np.int64)
        h0, w0 = (int(v) for v in prepared.ori_shape)
        masks = None
        if with_masks:
            if len(slots):
                masks = self.model.paste(out.mask_probs[i][slots], out.mask_boxes[i][slots], (h0, w0),
                                         out.mask_valid[i][slots], bucket=128)
            else:
                masks = np.zeros((0, h0, w0), bool)
        names = np.asarray([self.class_names[label] for label in labels], dtype=object)
        return Result(name, np.asarray(out.boxes[i])[slots].astype(np.float32),
                      np.asarray(out.scores[i])[slots].astype(np.float32), labels, names, masks, (h0, w0),
                      self.category_ids)


def load_detector(config: Union[str, Any], weights: str, *, canvas: str = "per_image", batch_size: int = 1,
                  score_thr: Optional[float] = None, with_masks: bool = True,
                  class_names: Optional[Sequence[str]] = None, overrides: Sequence[str] = (),
                  device=None) -> Detector:
    """A :class:`Detector` from a config (a file path or a ConfigDict) and weights (a released ``.pth``, a
    ``convert_weights.py`` folder, a training workdir or one checkpoint step folder).

    Only the model section and the test pipeline settings of the config are used: its optimizer, dataset
    and ``model.pretrained`` are ignored. ``class_names`` overrides the names the weights carry; a count
    that disagrees with ``model.num_classes`` is an error. ``overrides``: ``'--config.a.b=value'`` strings.
    """
    from lit_jax.config import load_config, split_overrides
    from lit_jax.models.registry import build_detector

    if isinstance(config, (str, os.PathLike)):
        _, parsed = split_overrides(list(overrides))
        config = load_config(os.fspath(config), parsed)
    model = build_detector(inference_model_section(config))
    loaded = load_weights(weights, model)
    names, ids = resolve_class_names(loaded, model.cfg.num_classes, class_names)
    return Detector(model, loaded.variables, config, names, ids, canvas=canvas, batch_size=batch_size,
                    score_thr=score_thr, with_masks=with_masks, device=device)


def inference_model_section(config) -> dict:
    """``config.model`` without the keys that only training reads (where the starting weights come from)."""
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    for key in ("pretrained", "load_from"):
        model.pop(key, None)
    return model


