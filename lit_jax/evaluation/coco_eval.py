"""COCO results formatting and evaluation with mmdetection 2.11's ``CocoDataset`` semantics.

Formatting (``detections_to_coco``, mmdet ``_det2json`` / ``_segm2json``):

* boxes arrive ``(x1, y1, x2, y2)`` in ORIGINAL image pixels (decoded, clipped to ``img_shape`` and divided by
  ``scale_factor``; there is no clip after that, parity_spec §2), and are written as
  ``bbox = [x1, y1, x2 - x1, y2 - y1]``: the coordinates are converted to Python floats first (``.tolist()``,
  exact for float32 input) and the width/height are then computed in float64, exactly as mmdet's
  ``xyxy2xywh``; ``score = float(score)``; ``category_id = label_to_category_id[label]``;
* per image the detections are written grouped by label (stable, so the detector's order is kept inside a
  class), which is the order of mmdet's per-class ``bbox2result`` lists. COCOeval only depends on the order
  inside one (image, category) pair (for score ties), and that order is the detector's in both;
* masks (parity_spec §10): a binary mask per detection at the original image size is encoded with
  ``pycocotools.mask.encode`` on a uint8 Fortran-order array and ``counts`` is decoded to ``str``; the segm
  score is the bbox score. A result with a mask carries both ``bbox`` and ``segmentation``: one list serves
  both evaluations (mmdet writes the same dicts to ``*.bbox.json`` / ``*.segm.json``; the bbox evaluation
  ignores ``segmentation``).

Evaluation (``CocoEvaluator.evaluate``) reproduces mmdet 2.11 ``CocoDataset.evaluate`` for
``metric='bbox'`` / ``'segm'`` (and ``'proposal'``):

* ``COCOeval(gt, gt.loadRes(results), iou_type)`` with ``params.imgIds`` = every image of the annotation file
  (mmdet's test set is unfiltered), ``params.catIds`` = the file's categories, ``params.iouThrs`` =
  ``linspace(.5, .95, 10)`` (the pycocotools default) and the default ``areaRng``
  (all ``[0, 1e5^2]``, small ``[0, 32^2]``, medium ``[32^2, 96^2]``, large ``[96^2, 1e5^2]``);
* ``params.maxDets = list(proposal_nums) = [100, 300, 1000]`` for **every** metric, bbox and segm included,
  not only for proposals. In ``summarize()`` that makes ``stats[0]`` (mAP) use maxDets 100 (the default of
  ``_summarize``), ``stats[1:6]`` (mAP_50, mAP_75, mAP_s/m/l) use maxDets **1000**, and the AR entries become
  AR@100/300/1000. With at most 100 detections per image (``max_per_img=100`` in every LIT config) the AP
  values equal the standard ``[1, 10, 100]`` evaluation; only the AR rows differ. ``max_dets=(1, 10, 100)``
  gives the standard pycocotools protocol;
* returned keys ``{iou}_mAP, {iou}_mAP_50, {iou}_mAP_75, {iou}_mAP_s, {iou}_mAP_m, {iou}_mAP_l`` as
  ``float(f'{stat:.3f}')`` (mmdet rounds to 3 decimals; ``ndigits=None`` returns the exact ``stats``) and
  ``{iou}_mAP_copypaste``; ``metric_items`` selects others (``AR@100`` ...) as in mmdet;
* segm quirk: before v2.12 mmdet left ``bbox`` in the segm results, so ``loadRes`` takes its bbox branch and
  every detection's ``area`` is the **box** area (used by COCOeval to ignore unmatched detections outside an
  area range), not the mask area. This changes mAP_s/m/l of segm only (mmdet >= 2.12 pops ``bbox``).
  ``segm_area='box'`` (default) reproduces 2.11; ``segm_area='mask'`` gives the >= 2.12 behaviour;
* deliberate difference: when the results are empty mmdet 2.11 logs "The testing results of the whole
  dataset is empty." and returns no metrics (``loadRes`` raises ``IndexError`` on ``anns[0]``); here an
  empty result set is evaluated as such: AP/AR 0 where ground truth exists and -1 where none does
  (pycocotools semantics), so a first evaluation of an untrained model never crashes.

``evaluate`` copies the results through JSON before ``loadRes`` (which mutates its input), so evaluating the
in-memory list and evaluating the file ``write`` produced give bit-identical numbers.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "MMDET_MAX_DETS",
    "COCO_MAX_DETS",
    "CocoEvaluator",
    "detections_to_coco",
    "encode_masks",
    "evaluate_results_file",
    "load_coco",
]

#: ``params.maxDets`` mmdet 2.11 sets for bbox, segm and proposal evaluation (``proposal_nums``).
MMDET_MAX_DETS = (100, 300, 1000)
#: pycocotools' own default for bbox/segm.
COCO_MAX_DETS = (1, 10, 100)
#: ``iouThrs`` mmdet passes (identical to the pycocotools default).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)

_IOU_TYPES = ("bbox", "segm", "proposal")
_DEFAULT_ITEMS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------------
def _rle_to_json(rle: Mapping[str, Any]) -> dict:
    """A compressed RLE with ``counts`` as ``str`` (uncompressed list counts are compressed first)."""
    rle = dict(rle)
    if "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE needs 'size' and 'counts', got keys {sorted(rle)}")
    if isinstance(rle["counts"], (list, tuple, np.ndarray)):
        h, w = (int(v) for v in rle["size"])
        rle = dict(mask_util.frPyObjects({"size": [h, w], "counts": [int(c) for c in rle["counts"]]}, h, w))
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def encode_masks(masks: Any) -> list:
    """Binary masks ``(N, H, W)`` (bool, or integers where nonzero is foreground) -> N COCO RLE dicts.

    Same result as mmdet's ``mask_util.encode(np.array(mask[:, :, None], order='F', dtype='uint8'))[0]`` per
    mask (pycocotools encodes each ``[:, :, i]`` slice of an ``(H, W, N)`` Fortran array independently); the
    counts are decoded to ``str``.
    """
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    bits = np.asfortranarray(masks.astype(bool).astype(np.uint8).transpose(1, 2, 0))
    return [_rle_to_json(r) for r in mask_util.encode(bits)]


def _category_lookup(label_to_category_id: Union[Sequence[int], Mapping[int, int]]):
    if isinstance(label_to_category_id, Mapping):
        table = {int(k): int(v) for k, v in label_to_category_id.items()}
    else:
        table = {i: int(v) for i, v in enumerate(list(np.asarray(label_to_category_id).reshape(-1)))}

    def lookup(label: int) -> int:
        try:
            return table[label]
        except KeyError:
            raise ValueError(f"label {label} has no COCO category id (label_to_category_id knows "
                             f"{sorted(table)[:10]}{'...' if len(table) > 10 else ''})") from None

    return lookup


def _image_masks(entry: Any, slots: np.ndarray, valid_slots: np.ndarray, num_slots: int, image_id: int) -> list:
    """The RLEs of ``slots`` (slot indices, in output order) from one image's ``masks`` entry.

    ``entry`` is aligned either with all ``num_slots`` slots or with the valid slots only (in slot order).
    """
    if entry is None:
        if len(slots):
            raise ValueError(f"image {image_id}: {len(slots)} valid detections but its masks entry is None")
        return []
    n = len(entry)
    if n == num_slots:
        rows = slots
    elif n == len(valid_slots):
        pos = {int(s): i for i, s in enumerate(valid_slots)}
        rows = np.asarray([pos[int(s)] for s in slots], np.int64)
    else:
        raise ValueError(f"image {image_id}: masks has {n} entries; expected one per slot ({num_slots}) or one "
                         f"per valid detection ({len(valid_slots)})")
    if isinstance(entry, np.ndarray) or hasattr(entry, "__array__") and not isinstance(entry, (list, tuple)):
        arr = np.asarray(entry)
        if arr.ndim != 3:
            raise ValueError(f"image {image_id}: masks must be (K, H, W), got shape {arr.shape}")
        return encode_masks(arr[rows])
    out = []
    for r in rows:
        m = entry[int(r)]
        if isinstance(m, Mapping):
            out.append(_rle_to_json(m))
        elif m is None:
            raise ValueError(f"image {image_id}: a valid detection (row {int(r)}) has no mask")
        else:
            out.extend(encode_masks(np.asarray(m)[None]))
    return out


def detections_to_coco(image_ids: Any, boxes: Any, scores: Any, labels: Any, valid: Any,
                       label_to_category_id: Union[Sequence[int], Mapping[int, int]],
                       masks: Optional[Sequence[Any]] = None) -> list:
    """Batched detections -> COCO result dicts (mmdet ``_det2json`` / ``_segm2json``).

    Args:
      image_ids: ``(B,)`` COCO image ids.
      boxes: ``(B, K, 4)`` ``x1, y1, x2, y2`` in original-image pixels (already divided by ``scale_factor``).
      scores: ``(B, K)``.
      labels: ``(B, K)`` contiguous labels in ``[0, num_classes)``.
      valid: ``(B, K)`` bool; invalid (padding) slots are skipped. ``None`` means all valid.
      label_to_category_id: sequence (``seq[label]``) or dict mapping a label to its COCO category id.
      masks: optional, one entry per image: a ``(K, H, W)`` bool/uint8 array at the original image size, or a
        list of per-detection 2-D masks or RLE dicts (``counts`` bytes, str or an uncompressed list). The
        entry is aligned either with all K slots or with the valid slots only (in slot order). With masks,
        every result also gets ``segmentation`` (an RLE with ``str`` counts).

    Returns:
      ``[{'image_id', 'bbox': [x, y, w, h], 'score', 'category_id'[, 'segmentation']}, ...]`` with Python
      scalars only; per image in label order (stable), images in input order.
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if boxes.ndim == 2 and image_ids.size == 1:  # one unbatched image
        boxes, scores, labels = boxes[None], scores.reshape(1, -1), labels.reshape(1, -1)
        valid = None if valid is None else np.asarray(valid).reshape(1, -1)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, K, 4), got shape {boxes.shape}")
    b, k = boxes.shape[:2]
    valid = np.ones((b, k), bool) if valid is None else np.asarray(valid).astype(bool)
    for name, arr in (("scores", scores), ("labels", labels), ("valid", valid)):
        if arr.shape != (b, k):
            raise ValueError(f"{name} must be (B, K) = {(b, k)}, got shape {arr.shape}")
    if image_ids.shape != (b,):
        raise ValueError(f"image_ids must be (B,) = ({b},), got shape {image_ids.shape}")
    if masks is not None and len(masks) != b:
        raise ValueError(f"masks must have one entry per image ({b}), got {len(masks)}")
    category = _category_lookup(label_to_category_id)

    results = []
    for i in range(b):
        image_id = int(image_ids[i])
        valid_slots = np.flatnonzero(valid[i])
        slots = valid_slots[np.argsort(labels[i, valid_slots], kind="stable")]
        box_list = boxes[i, slots].tolist()
        score_list = scores[i, slots].tolist()
        label_list = labels[i, slots].tolist()
        rles = _image_masks(masks[i], slots, valid_slots, k, image_id) if masks is not None else None
        for j, (x1, y1, x2, y2) in enumerate(box_list):
            det = {
                "image_id": image_id,
                "bbox": [float(x1), float(y1), float(x2) - float(x1), float(y2) - float(y1)],
                "score": float(score_list[j]),
                "category_id": category(int(label_list[j])),
            }
            if rles is not None:
                det["segmentation"] = rles[j]
            results.append(det)
    return results


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------
def load_coco(ann_file_or_coco: Union[PathLike, COCO, Mapping[str, Any]], verbose: bool = False) -> COCO:
    """A pycocotools ``COCO`` from a path, a ``COCO`` (returned as is) or an annotation dict."""
    if isinstance(ann_file_or_coco, COCO):
        return ann_file_or_coco
    with _maybe_quiet(verbose):
        if isinstance(ann_file_or_coco, Mapping):
            coco = COCO()
            coco.dataset = json.loads(json.dumps(ann_file_or_coco))
            coco.createIndex()
            return coco
        return COCO(os.fspath(ann_file_or_coco))


def _maybe_quiet(verbose: bool):
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _load_results(results: Union[PathLike, Iterable[Mapping[str, Any]]]) -> list:
    if isinstance(results, (str, os.PathLike)):
        with open(os.fspath(results)) as f:
            out = json.load(f)
        if not isinstance(out, list):
            raise ValueError(f"{os.fspath(results)}: a COCO results file holds a JSON list, got {type(out).__name__}")
        return out
    return list(results)


def _empty_results(coco_gt: COCO) -> COCO:
    """What ``loadRes`` would build for a result list with nothing in it (it raises ``IndexError`` instead)."""
    res = COCO()
    res.dataset = {
        "info": dict(coco_gt.dataset.get("info", {})),
        "images": list(coco_gt.dataset["images"]),
        "categories": [dict(c) for c in coco_gt.dataset.get("categories", [])],
        "annotations": [],
    }
    res.createIndex()
    return res


def _metric_index(max_dets: Sequence[int]) -> "OrderedDict[str, int]":
    """mmdet's ``coco_metric_names`` for the given ``maxDets`` (AR@100/300/1000 for mmdet's default)."""
    m0, m1, m2 = max_dets
    return OrderedDict([
        ("mAP", 0), ("mAP_50", 1), ("mAP_75", 2), ("mAP_s", 3), ("mAP_m", 4), ("mAP_l", 5),
        (f"AR@{m0}", 6), (f"AR@{m1}", 7), (f"AR@{m2}", 8),
        (f"AR_s@{m2}", 9), (f"AR_m@{m2}", 10), (f"AR_l@{m2}", 11),
    ])


def _fmt(value: float, ndigits: Optional[int]) -> float:
    return float(value) if ndigits is None else float(f"{float(value):.{int(ndigits)}f}")


class CocoEvaluator:
    """Accumulates detections batch by batch and evaluates them against a COCO annotation file.

    Args:
      ann_file_or_coco: annotation JSON path, a pycocotools ``COCO`` or an annotation dict.
      image_ids: images to evaluate; default every image of the annotation file (mmdet's test set).
      cat_ids: categories to evaluate; default every category, in file order (for COCO that is mmdet's
        ``CLASSES`` order, so it is also the default ``label -> category id`` table of ``add``).
      max_dets: ``params.maxDets`` (3 values); default mmdet's ``(100, 300, 1000)``; see the module docstring.
      iou_thrs: ``params.iouThrs``; default ``linspace(.5, .95, 10)``.
      segm_area: ``'box'`` (mmdet 2.11: detection area = box area in segm evaluation) or ``'mask'``.
      ndigits: rounding of the returned metrics (mmdet: 3); ``None`` for the exact ``COCOeval.stats``.
      verbose: print pycocotools' progress and the summary tables (as mmdet does).

    After ``evaluate`` the ``COCOeval`` objects and their exact ``stats`` are in ``self.coco_evals`` and
    ``self.stats`` (keyed by iou type).
    """

    def __init__(self, ann_file_or_coco: Union[PathLike, COCO, Mapping[str, Any]], *,
                 image_ids: Optional[Sequence[int]] = None, cat_ids: Optional[Sequence[int]] = None,
                 max_dets: Sequence[int] = MMDET_MAX_DETS, iou_thrs: Optional[Sequence[float]] = None,
                 segm_area: str = "box", ndigits: Optional[int] = 3, verbose: bool = True):
        self.coco = load_coco(ann_file_or_coco, verbose=False)
        self._known_img_ids = frozenset(int(i) for i in self.coco.getImgIds())
        self.img_ids = [int(i) for i in (self.coco.getImgIds() if image_ids is None else image_ids)]
        self.cat_ids = [int(c) for c in (self.coco.getCatIds() if cat_ids is None else cat_ids)]
        self.max_dets = self._check_max_dets(max_dets)
        self.iou_thrs = np.asarray(IOU_THRS if iou_thrs is None else iou_thrs, np.float64)
        self.segm_area = self._check_segm_area(segm_area)
        self.ndigits = ndigits
        self.verbose = verbose
        self.results: list = []
        self.coco_evals: dict = {}
        self.stats: dict = {}

    # ---- accumulation ----
    @property
    def label_to_category_id(self) -> list:
        """Default ``label -> category id`` table: the evaluated categories in order."""
        return list(self.cat_ids)

    def add(self, image_ids: Any, boxes: Any, scores: Any, labels: Any, valid: Any = None,
            label_to_category_id: Union[Sequence[int], Mapping[int, int], None] = None,
            masks: Optional[Sequence[Any]] = None) -> list:
        """Formats one batch (``detections_to_coco``), appends it to ``self.results`` and returns it."""
        table = self.label_to_category_id if label_to_category_id is None else label_to_category_id
        return self.extend(detections_to_coco(image_ids, boxes, scores, labels, valid, table, masks=masks))

    def extend(self, dets: list) -> list:
        """Appends COCO result dicts (checking that their images are in the annotation file); returns them."""
        unknown = {d["image_id"] for d in dets} - self._known_img_ids
        if unknown:
            raise ValueError(f"image ids {sorted(unknown)[:10]} are not in the annotation file")
        self.results.extend(dets)
        return dets

    def reset(self) -> None:
        self.results = []
        self.coco_evals = {}
        self.stats = {}

    def write(self, path: PathLike, iou_type: Optional[str] = None) -> str:
        """Writes the results as a COCO results JSON; ``iou_type='bbox'`` drops ``segmentation``,
        ``'segm'`` keeps only results with a mask. Returns the path."""
        path = os.fspath(path)
        if iou_type in (None, "segm"):
            out = [r for r in self.results if iou_type is None or "segmentation" in r]
        elif iou_type in ("bbox", "proposal"):
            out = [{k: v for k, v in r.items() if k != "segmentation"} for r in self.results]
        else:
            raise ValueError(f"iou_type must be None, 'bbox', 'segm' or 'proposal', got {iou_type!r}")
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f)
        return path

    # ---- evaluation ----
    @staticmethod
    def _check_max_dets(max_dets: Sequence[int]) -> list:
        md = sorted(int(m) for m in max_dets)
        if len(md) != 3:
            raise ValueError(f"max_dets needs 3 values (COCOeval.summarize reads maxDets[0..2]), got {max_dets}")
        return md

    @staticmethod
    def _check_segm_area(segm_area: str) -> str:
        if segm_area not in ("box", "mask"):
            raise ValueError(f"segm_area must be 'box' (mmdet 2.11) or 'mask' (mmdet >= 2.12), got {segm_area!r}")
        return segm_area

    def evaluate(self, iou_types: Union[str, Sequence[str]] = ("bbox",),
                 results: Union[PathLike, Iterable[Mapping[str, Any]], None] = None, *,
                 image_ids: Optional[Sequence[int]] = None, cat_ids: Optional[Sequence[int]] = None,
                 max_dets: Optional[Sequence[int]] = None, iou_thrs: Optional[Sequence[float]] = None,
                 metric_items: Union[str, Sequence[str], None] = None, classwise: bool = False,
                 segm_area: Optional[str] = None, ndigits: Union[int, None, str] = "default",
                 verbose: Optional[bool] = None) -> "OrderedDict[str, Any]":
        """Runs COCOeval for each of ``iou_types`` ('bbox', 'segm', 'proposal') as mmdet does.

        Args:
          iou_types: a name or a sequence of names.
          results: result dicts or a results JSON path; default ``self.results``.
          image_ids, cat_ids, max_dets, iou_thrs, segm_area, verbose: override the constructor's values.
          metric_items: mmdet's ``metric_items`` (e.g. ``'mAP'``, ``'AR@100'``); default the six mAP entries
            for bbox/segm and the six AR entries for proposal.
          classwise: also print a per-category AP table (mmdet's ``classwise``).
          ndigits: override the rounding (``None`` = exact stats).

        Returns:
          ``{'bbox_mAP': ..., 'bbox_mAP_50': ..., ..., 'bbox_mAP_copypaste': '0.xxx ...'}`` (and ``segm_*``;
          proposal items are unprefixed, as in mmdet).
        """
        iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
        for t in iou_types:
            if t not in _IOU_TYPES:
                raise KeyError(f"iou type {t!r} is not supported; use one of {_IOU_TYPES}")
        all_results = self.results if results is None else _load_results(results)
        img_ids = self.img_ids if image_ids is None else [int(i) for i in image_ids]
        cats = self.cat_ids if cat_ids is None else [int(c) for c in cat_ids]
        md = self.max_dets if max_dets is None else self._check_max_dets(max_dets)
        thrs = self.iou_thrs if iou_thrs is None else np.asarray(iou_thrs, np.float64)
        area = self.segm_area if segm_area is None else self._check_segm_area(segm_area)
        nd = self.ndigits if ndigits == "default" else ndigits
        verbose = self.verbose if verbose is None else verbose
        names = _metric_index(md)
        if metric_items is not None:
            metric_items = [metric_items] if isinstance(metric_items, str) else list(metric_items)
            for item in metric_items:
                if item not in names:
                    raise KeyError(f"metric item {item!r} is not supported; use one of {list(names)}")

        out: "OrderedDict[str, Any]" = OrderedDict()
        for iou_type in iou_types:
            dets = self._results_for(iou_type, all_results, area)
            with _maybe_quiet(verbose):
                print(f"\nEvaluating {iou_type}...")
                if not dets:
                    print(f"No {iou_type} results: evaluating an empty result set (mmdet 2.11 would report "
                          "nothing).")
                coco_dt = _empty_results(self.coco) if not dets else self.coco.loadRes(dets)
                ev = COCOeval(self.coco, coco_dt, "bbox" if iou_type == "proposal" else iou_type)
                ev.params.catIds = list(cats)
                ev.params.imgIds = list(img_ids)
                ev.params.maxDets = list(md)
                ev.params.iouThrs = np.array(thrs)
                if iou_type == "proposal":
                    ev.params.useCats = 0
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                if classwise and iou_type != "proposal":
                    per_class = self._classwise_ap(ev, cats)
                    print(self._classwise_table(per_class))
            self.coco_evals[iou_type] = ev
            self.stats[iou_type] = np.array(ev.stats, copy=True)
            if iou_type == "proposal":
                items = metric_items or [k for k in names if k.startswith("AR")]
                for item in items:
                    out[item] = _fmt(ev.stats[names[item]], nd)
            else:
                items = metric_items or list(_DEFAULT_ITEMS)
                for item in items:
                    out[f"{iou_type}_{item}"] = _fmt(ev.stats[names[item]], nd)
                ap = ev.stats[:6]
                out[f"{iou_type}_mAP_copypaste"] = " ".join(f"{v:.3f}" for v in ap)
                if classwise:
                    out[f"{iou_type}_AP_per_class"] = {name: _fmt(v, nd) for name, v in per_class}
        return out

    @staticmethod
    def _results_for(iou_type: str, results: list, segm_area: str) -> list:
        """The result dicts ``loadRes`` gets for one iou type: a JSON copy (``loadRes`` mutates its input)."""
        if iou_type == "segm":
            with_mask = [r for r in results if "segmentation" in r]
            if results and not with_mask:
                raise KeyError("segm is not in the results: no result has a 'segmentation' (pass masks to add)")
            if len(with_mask) != len(results):
                raise ValueError(f"{len(results) - len(with_mask)} of {len(results)} results have no segmentation")
            dets = json.loads(json.dumps(with_mask))
            if segm_area == "mask":  # mmdet >= 2.12: area from the mask
                for d in dets:
                    d.pop("bbox", None)
            return dets
        dets = json.loads(json.dumps([{k: v for k, v in r.items() if k != "segmentation"} for r in results]))
        return dets

    def _classwise_ap(self, ev: COCOeval, cats: Sequence[int]) -> list:
        """mmdet's per-category AP (IoU .5:.95, all areas, the last maxDets): ``[(name, ap), ...]`` in ``cats``
        order; NaN for a category without ground truth."""
        precisions = ev.eval["precision"]
        rows = []
        for idx, cat_id in enumerate(cats):
            p = precisions[:, :, idx, 0, -1]
            p = p[p > -1]
            rows.append((str(self.coco.loadCats(cat_id)[0].get("name", cat_id)),
                         float(np.mean(p)) if p.size else float("nan")))
        return rows

    @staticmethod
    def _classwise_table(rows: Sequence[tuple]) -> str:
        """The per-category AP rows as a plain-text table."""
        width = max([len("category")] + [len(r[0]) for r in rows])
        lines = [f"{'category':<{width}}  AP", "-" * (width + 7)]
        lines += [f"{n:<{width}}  {a:0.3f}" for n, a in rows]
        return "\n".join(lines)


def evaluate_results_file(ann_file: Union[PathLike, COCO, Mapping[str, Any]], results_json: PathLike,
                          iou_types: Union[str, Sequence[str]] = ("bbox",), **kwargs) -> "OrderedDict[str, Any]":
    """Evaluates a COCO results JSON against an annotation file (``kwargs`` as ``CocoEvaluator.evaluate``,
    plus the constructor's ``image_ids`` ... ``verbose``)."""
    ctor_keys = ("image_ids", "cat_ids", "max_dets", "iou_thrs", "segm_area", "ndigits", "verbose")
    ctor = {k: kwargs.pop(k) for k in ctor_keys if k in kwargs}
    return CocoEvaluator(ann_file, **ctor).evaluate(iou_types, results=results_json, **kwargs)
