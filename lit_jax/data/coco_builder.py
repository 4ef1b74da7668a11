"""tfds builder for any COCO-format instance dataset on disk (annotation JSON + image folder).

The main case is COCO 2017 in mmdetection's layout::

    DIR/annotations/instances_train2017.json   DIR/train2017/*.jpg   -> split 'train'
    DIR/annotations/instances_val2017.json     DIR/val2017/*.jpg     -> split 'val'

Every ``annotations/instances_<X>.json`` with an image folder ``<X>/`` becomes a split named ``<X>`` minus a
trailing 4-digit year. Other layouts pass the splits explicitly (``CocoInstancesConfig.splits``).

One record per image (the original file's bytes, not re-encoded, so the pipeline decodes exactly the file
the original decodes)::

    image                     encoded bytes (tfds Image feature; read with SkipDecoding)
    image/id                  int64, COCO image id
    image/filename            str, file name relative to the split's image folder
    image/height, image/width int64, the JSON's size (mmdet's img_info)
    image/decoded_height, image/decoded_width
                              int64, the size cv2.imdecode(IMREAD_COLOR) gives (EXIF orientation applied):
                              the JSON size, or its transpose when an EXIF orientation tag rotates the image
                              (any other size is bad input); the JSON size when verify_images=False
    image/has_annotations     bool, mmdet's ``filter_empty_gt`` criterion: at least one annotation of a
                              known category in the JSON (crowd, tiny and skipped-bad ones count)
    objects/id                int64, COCO annotation id
    objects/bbox              float32 (4,), [x, y, x + w, y + h] in pixels of the original image
    objects/label             int64, contiguous label (index into metadata['category_ids'])
    objects/category_id       int64, COCO category id
    objects/is_crowd          bool
    objects/area              float32, the JSON's area
    objects/skip_train        bool, mmdet's ``_parse_ann_info`` drops it (``ignore`` flag, no overlap with
                              the image, area <= 0, w < 1 or h < 1): neither a target nor a crowd region
    objects/mask              str, the mask as a compressed COCO RLE ``counts`` string at the JSON image
                              size (polygons are rasterised and merged with pycocotools exactly as mmdet's
                              ``_poly2mask``); '' when the dataset is built without masks

Dataset metadata (``builder.info.metadata``, saved as metadata.json): ``category_ids`` (contiguous label ->
COCO category id), ``category_names``, ``source_dir``, per split the annotation file, image folder, counts
of images / annotations kept and in the JSON, skipped bad inputs per reason (images and annotations), the
EXIF-rotated image ids, and an ``index`` per split (image id,
JSON and decoded sizes, has_annotations, number of training instances) that the input pipeline reads to
assign aspect-ratio buckets and host shards without a pass over the records.

Build once with ``python -m lit_jax.data.prepare --coco_dir DIR [--out DIR]``; building an existing
version is a no-op (tfds reuses it).

Bad input is never silently dropped: a JSON that does not parse, lacks a required field, an image that is
missing or does not decode or whose decoded size fits neither the JSON size nor its EXIF transpose, a
duplicate image id, a box with zero or negative size, a polygon with fewer than 3 points, an
unknown image or category id, or a malformed RLE raises ``CocoFormatError`` naming the annotation file,
the image file and the annotation id; with ``skip_bad=True`` the offending annotation (or image, with its
annotations) is skipped and counted per reason in the log and in the metadata.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import json
import logging
import math
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

BUILDER_NAME = "coco_instances"
VERSION = "1.0.0"


class CocoFormatError(ValueError):
    """Bad input in a COCO-format dataset; the message names the file and the annotation id."""


# ----------------------------------------------------------------------------------------------------
# Discovery of splits
# ----------------------------------------------------------------------------------------------------
def discover_splits(coco_dir: str) -> tuple[tuple[str, str, str], ...]:
    """``(split_name, ann_file, img_dir)`` (paths relative to coco_dir) for mmdet's COCO layout."""
    files = sorted(glob.glob(os.path.join(coco_dir, "annotations", "instances_*.json")))
    found = []
    for f in files:
        stem = os.path.basename(f)[len("instances_"):-len(".json")]
        if not os.path.isdir(os.path.join(coco_dir, stem)):
            log.info("skipping %s: no image folder %s/", f, stem)
            continue
        found.append((stem, os.path.relpath(f, coco_dir), stem))
    names = [re.sub(r"\d{4}$", "", stem) or stem for stem, _, _ in found]
    if len(set(names)) != len(names):  # e.g. train2014 and train2017 side by side
        names = [stem for stem, _, _ in found]
    if not found:
        raise CocoFormatError(
            f"{coco_dir}: no annotations/instances_<split>.json with an image folder <split>/ found")
    return tuple((n, a, i) for n, (_, a, i) in zip(names, found))


def default_name(coco_dir: str) -> str:
    base = os.path.basename(os.path.normpath(os.path.abspath(coco_dir))).lower()
    base = re.sub(r"[^a-z0-9_]+", "_", base).strip("_")
    if not base or not base[0].isalpha():
        base = "ds_" + base
    return base


# ----------------------------------------------------------------------------------------------------
# Parsing and validation (pure Python; also used by tests)
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ParsedSplit:
    ann_file: str
    img_dir: str
    category_ids: list[int]
    category_names: list[str]
    images: list[dict[str, Any]]  # id, file_name, width, height, path, has_annotations, objects
    skipped: dict[str, dict[str, int]]  # reason -> {"images": n, "annotations": m}
    num_annotations: int
    num_images_in: int = 0  # entries of the JSON's 'images' / 'annotations'
    num_annotations_in: int = 0


class _Bad:
    """Raises or counts bad input, depending on skip_bad; counts are per reason, of images and annotations."""

    def __init__(self, ann_file: str, skip_bad: bool):
        self.ann_file = ann_file
        self.skip_bad = skip_bad
        self.counts: dict[str, dict[str, int]] = {}
        self.examples: dict[str, str] = {}

    def __call__(self, kind: str, msg: str, *, images: int = 0, annotations: int = 0) -> None:
        full = f"{self.ann_file}: {msg}"
        if not self.skip_bad:
            raise CocoFormatError(full + " (pass skip_bad=True / --skip_bad to skip such entries)")
        self.count(kind, images=images, annotations=annotations)
        self.examples.setdefault(kind, full)
        log.debug("skipped: %s", full)

    def count(self, kind: str, *, images: int = 0, annotations: int = 0) -> None:
        c = self.counts.setdefault(kind, {"images": 0, "annotations": 0})
        c["images"] += images
        c["annotations"] += annotations


def merge_skipped(into: dict[str, dict[str, int]], counts: dict[str, dict[str, int]]) -> None:
    """Adds per-reason ``{"images": n, "annotations": m}`` counts into ``into``."""
    for kind, c in counts.items():
        d = into.setdefault(kind, {"images": 0, "annotations": 0})
        d["images"] += c["images"]
        d["annotations"] += c["annotations"]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def segmentation_to_rle(seg, h: int, w: int) -> dict[str, Any]:
    """mmdet's ``_poly2mask`` up to the decode: polygons / uncompressed RLE / RLE -> one compressed RLE."""
    from pycocotools import mask as mask_utils
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return rle


def _check_segmentation(seg, h: int, w: int) -> str | None:
    """None when valid, else the reason."""
    if isinstance(seg, list):
        if not seg:
            return "segmentation is an empty polygon list"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return f"polygon {k} is not a list of numbers"
            if len(poly) % 2:
                return f"polygon {k} has an odd number of coordinates ({len(poly)})"
            if len(poly) < 6:
                return f"polygon {k} has fewer than 3 points ({len(poly) // 2})"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if (not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size)):
            return "RLE segmentation lacks a valid 'size' [h, w]"
        if list(size) != [h, w]:
            return f"RLE size {size} differs from the image size [{h}, {w}]"
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                return "uncompressed RLE counts are not non-negative ints"
            if sum(counts) != h * w:
                return f"uncompressed RLE counts sum to {sum(counts)}, not h*w = {h * w}"
            return None
        if isinstance(counts, (str, bytes)):
            try:
                from pycocotools import mask as mask_utils
                c = counts.encode("ascii") if isinstance(counts, str) else counts
                area = mask_utils.area({"size": size, "counts": c})
                dec = decode_rle_counts(c.decode("ascii"))
            except Exception as e:  # noqa: BLE001
                return f"compressed RLE counts do not decode ({e})"
            if int(np.sum(dec)) != h * w or area < 0:
                return f"compressed RLE counts sum to {int(np.sum(dec))}, not h*w = {h * w}"
            return None
        return "RLE segmentation lacks 'counts'"
    return f"segmentation of type {type(seg).__name__} is neither polygons nor RLE"


def decode_rle_counts(s: str) -> np.ndarray:
    """Reference decoder of a compressed COCO RLE string into run lengths (pycocotools' rleFrString)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    arr = np.asarray(counts, np.int64)
    if (arr < 0).any():
        raise ValueError("negative run length")
    return arr


def parse_split(coco_dir: str, ann_file: str, img_dir: str, *, with_masks: bool = True,
                skip_bad: bool = False) -> ParsedSplit:
    """Reads and validates one annotation file. Images are checked for existence only (see verify_images)."""
    ann_path = os.path.join(coco_dir, ann_file)
    if not os.path.isfile(ann_path):
        raise CocoFormatError(f"{ann_path}: annotation file not found")
    try:
        with open(ann_path) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{ann_path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CocoFormatError(f"{ann_path}: the top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise CocoFormatError(f"{ann_path}: required field '{key}' is missing or not a list")

    bad = _Bad(ann_path, skip_bad)
    cat_ids, cat_names = [], []
    for k, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise CocoFormatError(f"{ann_path}: categories[{k}] lacks an int 'id' or a str 'name'")
        if c["id"] in cat_ids:
            raise CocoFormatError(f"{ann_path}: duplicate category id {c['id']}")
        cat_ids.append(c["id"])
        cat_names.append(c["name"])
    if not cat_ids:
        raise CocoFormatError(f"{ann_path}: no categories")
    cat2label = {c: i for i, c in enumerate(cat_ids)}

    # An image id used by several entries: its annotations cannot be told apart, so all go.
    id_uses = collections.Counter(im.get("id") for im in doc["images"]
                                  if isinstance(im, dict) and _is_int(im.get("id")))
    images: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    bad_image_kind: dict[int, str] = {}  # image id -> reason it was skipped (its annotations follow it)
    for k, im in enumerate(doc["images"]):
        iid = im.get("id") if isinstance(im, dict) else None
        where = f"images[{k}] (id {iid})"
        if not isinstance(im, dict) or not _is_int(iid):
            bad("image_field", f"{where}: lacks an int 'id'", images=1)
            continue
        fn = im.get("file_name")
        if id_uses[iid] > 1:
            bad_image_kind[iid] = "duplicate_image_id"
            bad("duplicate_image_id", f"{where} ({fn}): image id {iid} is used by {id_uses[iid]} image "
                f"entries; their annotations cannot be told apart, so all of them are skipped", images=1)
            continue
        if not isinstance(fn, str) or not fn:
            bad_image_kind[iid] = "image_field"
            bad("image_field", f"{where}: lacks a 'file_name'", images=1)
            continue
        w, h = im.get("width"), im.get("height")
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            bad_image_kind[iid] = "image_field"
            bad("image_field", f"{where} ({fn}): lacks a positive int 'width'/'height'", images=1)
            continue
        path = os.path.join(coco_dir, img_dir, fn)
        if not os.path.isfile(path):
            bad_image_kind[iid] = "missing_image"
            bad("missing_image", f"image {path} (id {iid}) not found", images=1)
            continue
        images[iid] = dict(id=iid, file_name=fn, width=w, height=h, path=path, has_annotations=False,
                           objects=[])
        order.append(iid)

    seen_ann: set[int] = set()
    n_ann = 0
    for k, a in enumerate(doc["annotations"]):
        aid = a.get("id") if isinstance(a, dict) else None
        if not isinstance(a, dict) or not _is_int(aid):
            bad("ann_field", f"annotations[{k}]: lacks an int 'id'", annotations=1)
            continue
        iid = a.get("image_id")
        im = images.get(iid) if _is_int(iid) else None
        fname = im["file_name"] if im else "?"
        where = f"annotation id {aid} (image id {iid}, {fname})"
        if aid in seen_ann:
            bad("ann_field", f"{where}: duplicate annotation id", annotations=1)
            continue
        seen_ann.add(aid)
        if not _is_int(iid):
            bad("ann_field", f"{where}: lacks an int 'image_id'", annotations=1)
            continue
        if im is None:
            if iid in bad_image_kind:  # the image was skipped (and reported) already: count it there
                bad.count(bad_image_kind[iid], annotations=1)
            else:
                bad("ann_field", f"{where}: image id not among the image entries of the file", annotations=1)
            continue
        cid = a.get("category_id")
        if _is_int(cid) and cid in cat2label:
            im["has_annotations"] = True  # mmdet counts every annotation of a known category
        else:
            bad("ann_field", f"{where}: unknown category_id {cid!r}", annotations=1)
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            bad("ann_field", f"{where}: 'bbox' is not 4 finite numbers [x, y, w, h]", annotations=1)
            continue
        area = a.get("area")
        if not _is_number(area):
            bad("ann_field", f"{where}: lacks a numeric 'area'", annotations=1)
            continue
        iscrowd = a.get("iscrowd", 0)
        if iscrowd not in (0, 1, True, False):
            bad("ann_field", f"{where}: 'iscrowd' is {iscrowd!r}, not 0/1", annotations=1)
            continue
        x, y, bw, bh = bbox
        if bw <= 0 or bh <= 0:
            bad("bad_box", f"{where}: box has zero or negative size (w={bw}, h={bh})", annotations=1)
            continue
        rle_str = ""
        if with_masks:
            seg = a.get("segmentation")
            if seg is None:
                bad("bad_mask", f"{where}: lacks 'segmentation' (build with with_masks=False for boxes only)", annotations=1)
                continue
            reason = _check_segmentation(seg, im["height"], im["width"])
            if reason is not None:
                bad("bad_mask", f"{where}: {reason}", annotations=1)
                continue
            rle = segmentation_to_rle(seg, im["height"], im["width"])
            rle_str = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        # mmdet 2.11 CocoDataset._parse_ann_info, in its order.
        inter_w = max(0, min(x + bw, im["width"]) - max(x, 0))
        inter_h = max(0, min(y + bh, im["height"]) - max(y, 0))
        skip_train = bool(a.get("ignore", False)) or inter_w * inter_h == 0 or area <= 0 or bw < 1 or bh < 1
        im["objects"].append(dict(
            id=aid, bbox=[x, y, x + bw, y + bh], label=cat2label[cid], category_id=cid,
            is_crowd=bool(iscrowd), area=float(area), skip_train=skip_train, mask=rle_str))
        n_ann += 1

    if bad.counts:
        log.warning("%s: skipped bad entries: %s (e.g. %s)", ann_path, dict(bad.counts),
                    "; ".join(bad.examples.values()))
    return ParsedSplit(ann_file=ann_path, img_dir=img_dir, category_ids=cat_ids, category_names=cat_names,
                       images=[images[i] for i in order], skipped=bad.counts, num_annotations=n_ann,
                       num_images_in=len(doc["images"]), num_annotations_in=len(doc["annotations"]))


def decode_image_cv2(data: bytes):
    """cv2.imdecode(IMREAD_COLOR) (mmcv's 'color' flag): BGR uint8 with EXIF orientation, or None."""
    import cv2
    buf = np.frombuffer(data, np.uint8)
    if buf.size == 0:
        return None
    try:
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        return None


def _tiff_orientation(t: bytes) -> int | None:
    """The Orientation tag (0x0112) of IFD0 of a TIFF/EXIF block, or None."""
    if len(t) < 8 or t[:2] not in (b"II", b"MM"):
        return None
    e = "<" if t[:2] == b"II" else ">"
    ifd = int.from_bytes(t[4:8], "little" if e == "<" else "big")
    if ifd + 2 > len(t):
        return None
    n = int.from_bytes(t[ifd:ifd + 2], "little" if e == "<" else "big")
    for k in range(n):
        entry = t[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        if len(entry) < 12:
            return None
        tag, typ = np.frombuffer(entry[:4], np.dtype(e + "u2"))
        if tag == 0x0112 and typ == 3:  # SHORT
            return int(np.frombuffer(entry[8:10], np.dtype(e + "u2"))[0])
    return None


def exif_orientation(data: bytes) -> int | None:
    """EXIF orientation (1..8) of a JPEG (APP1 'Exif') or PNG ('eXIf' chunk), else None."""
    if data[:2] == b"\xff\xd8":
        p = 2
        while p + 4 <= len(data) and data[p] == 0xFF:
            marker = data[p + 1]
            if marker in (0xD9, 0xDA):  # end of image / start of scan: no more metadata
                return None
            seg_len = int.from_bytes(data[p + 2:p + 4], "big")
            if marker == 0xE1 and data[p + 4:p + 10] == b"Exif\x00\x00":
                return _tiff_orientation(data[p + 10:p + 2 + seg_len])
            p += 2 + seg_len
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        p = 8
        while p + 8 <= len(data):
            n = int.from_bytes(data[p:p + 4], "big")
            if data[p + 4:p + 8] == b"eXIf":
                return _tiff_orientation(data[p + 8:p + 8 + n])
            if data[p + 4:p + 8] == b"IDAT":
                return None
            p += 12 + n
    return None


# Orientations 5..8 swap width and height (transpose, rotate 90, transverse, rotate 270).
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)


def verify_images(split: ParsedSplit, *, skip_bad: bool, num_workers: int = 2, progress: bool = True
                  ) -> tuple[int, list[int]]:
    """Decodes every image with cv2; records its decoded size. Returns (#skipped, EXIF-rotated ids).

    The decoded (h, w) must be the JSON's (h, w), or its transpose when the file's EXIF orientation
    rotates by 90 degrees (cv2 applies it, as mmcv); anything else is a ``size_mismatch``.
    """
    bad = _Bad(split.ann_file, skip_bad)

    def check(im):
        with open(im["path"], "rb") as f:
            data = f.read()
        img = decode_image_cv2(data)
        return None if img is None else (img.shape[:2], exif_orientation(data))

    it: Any
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as ex:
        it = ex.map(check, split.images)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=len(split.images), desc=f"verifying {split.img_dir}", unit="img")
        results = list(it)
    kept, rotated = [], []
    for im, res in zip(split.images, results):
        n_obj = len(im["objects"])
        if res is None:
            bad("corrupt_image", f"image {im['path']} (id {im['id']}) does not decode with cv2",
                images=1, annotations=n_obj)
            continue
        (dh, dw), orientation = res
        json_hw = (im["height"], im["width"])
        if (dh, dw) != json_hw:
            if (dw, dh) != json_hw or orientation not in _ROTATING_ORIENTATIONS:
                why = ("and its EXIF orientation does not rotate it" if (dw, dh) == json_hw else
                       "nor its transpose")
                bad("size_mismatch", f"image {im['path']} (id {im['id']}) decodes to h x w = {dh} x {dw} "
                    f"but the JSON says {json_hw[0]} x {json_hw[1]} ({why}; EXIF orientation "
                    f"{orientation}); its boxes would not fit the image", images=1, annotations=n_obj)
                continue
            rotated.append(im["id"])
        im["decoded_height"], im["decoded_width"] = int(dh), int(dw)
        kept.append(im)
    n_skipped = len(split.images) - len(kept)
    split.images[:] = kept
    if n_skipped:
        merge_skipped(split.skipped, bad.counts)
        log.warning("%s: skipped %d images: %s (e.g. %s)", split.img_dir, n_skipped, bad.counts,
                    "; ".join(bad.examples.values()))
    if rotated:
        log.warning("%s: %d images carry an EXIF orientation that rotates them by 90 degrees; they decode "
                    "(orientation applied, as cv2/mmcv do) to the JSON size transposed, e.g. ids %s",
                    split.img_dir, len(rotated), rotated[:5])
    return n_skipped, rotated


# ----------------------------------------------------------------------------------------------------
# The tfds builder
# ----------------------------------------------------------------------------------------------------
def _tfds():
    import tensorflow_datasets as tfds
    return tfds


def _make_builder_classes():
    tfds = _tfds()

    @dataclasses.dataclass(eq=False)
    class CocoInstancesConfig(tfds.core.BuilderConfig):
        """A COCO-format source on disk.

        Attributes:
          coco_dir: the dataset root.
          splits: ``((split_name, ann_file, img_dir), ...)`` relative to coco_dir; empty = discover.
          with_masks: store masks (needs 'segmentation' on every annotation).
          skip_bad: skip (and count) bad entries instead of raising CocoFormatError.
          verify_images: decode every image with cv2 at build time (catches corrupt files, records the
            decoded size); otherwise only existence is checked and corrupt files fail in the pipeline.
          num_workers: threads for the image verification.
        """
        coco_dir: str = ""
        splits: tuple = ()
        with_masks: bool = True
        skip_bad: bool = False
        verify_images: bool = True
        num_workers: int = 2

    class CocoInstances(tfds.core.GeneratorBasedBuilder):
        """COCO-format instance detection / segmentation dataset read from a local directory."""

        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "Initial release."}
        BUILDER_CONFIGS: list = []  # configs are made from the source directory at build time

        # tfds 4.9.10's DatasetBuilder.code_path references the `importlib_resources` backport, which is
        # only installed on Python < 3.9; it serves to find a checksums file, which a local source lacks.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def _info(self):
            f = tfds.features
            features = f.FeaturesDict({
                "image": f.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image/id": f.Scalar(np.int64),
                "image/filename": f.Text(),
                "image/height": f.Scalar(np.int64),
                "image/width": f.Scalar(np.int64),
                "image/decoded_height": f.Scalar(np.int64),
                "image/decoded_width": f.Scalar(np.int64),
                "image/has_annotations": f.Scalar(np.bool_),
                "objects": f.Sequence({
                    "id": f.Scalar(np.int64),
                    "bbox": f.Tensor(shape=(4,), dtype=np.float32),
                    "label": f.Scalar(np.int64),
                    "category_id": f.Scalar(np.int64),
                    "is_crowd": f.Scalar(np.bool_),
                    "area": f.Scalar(np.float32),
                    "skip_train": f.Scalar(np.bool_),
                    "mask": f.Text(),
                }),
            })
            return self.dataset_info_from_configs(
                description="COCO-format instances (lit_jax.data.coco_builder).",
                features=features,
                metadata=tfds.core.MetadataDict(),
                homepage="https://cocodataset.org",
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            cfg = self.builder_config
            coco_dir = os.path.abspath(cfg.coco_dir)
            splits = tuple(cfg.splits) or discover_splits(coco_dir)
            md = self.info.metadata
            md["source_dir"] = coco_dir
            md["with_masks"] = bool(cfg.with_masks)
            md["splits"] = {}
            md["index"] = {}
            gens = {}
            for name, ann_file, img_dir in splits:
                parsed = parse_split(coco_dir, ann_file, img_dir, with_masks=cfg.with_masks,
                                     skip_bad=cfg.skip_bad)
                if "category_ids" in md and md["category_ids"] != parsed.category_ids:
                    raise CocoFormatError(f"{ann_file}: categories differ from the other splits'")
                md["category_ids"] = parsed.category_ids
                md["category_names"] = parsed.category_names
                rotated: list[int] = []
                if cfg.verify_images:
                    _, rotated = verify_images(parsed, skip_bad=cfg.skip_bad, num_workers=cfg.num_workers)
                for im in parsed.images:
                    im.setdefault("decoded_height", im["height"])
                    im.setdefault("decoded_width", im["width"])
                ims = parsed.images
                md["splits"][name] = dict(
                    ann_file=ann_file, img_dir=img_dir, num_images=len(ims),
                    num_annotations=sum(len(im["objects"]) for im in ims), skipped=parsed.skipped,
                    num_images_in=parsed.num_images_in, num_annotations_in=parsed.num_annotations_in,
                    exif_rotated=rotated, images_verified=bool(cfg.verify_images))
                md["index"][name] = dict(
                    image_id=[im["id"] for im in ims],
                    width=[im["width"] for im in ims], height=[im["height"] for im in ims],
                    decoded_width=[im["decoded_width"] for im in ims],
                    decoded_height=[im["decoded_height"] for im in ims],
                    has_annotations=[bool(im["has_annotations"]) for im in ims],
                    num_train_instances=[sum(1 for o in im["objects"]
                                             if not o["is_crowd"] and not o["skip_train"]) for im in ims],
                )
                log.info("split %s: %d images, %d annotations, skipped %s", name, len(ims),
                         md["splits"][name]["num_annotations"], parsed.skipped or "nothing")
                gens[name] = self._generate_examples(ims)
            return gens

        def _generate_examples(self, images: Sequence[dict[str, Any]]) -> Iterator[tuple[int, dict]]:
            for im in images:
                with open(im["path"], "rb") as f:
                    data = f.read()
                objs = im["objects"]
                yield im["id"], {
                    "image": data,
                    "image/id": im["id"],
                    "image/filename": im["file_name"],
                    "image/height": im["height"],
                    "image/width": im["width"],
                    "image/decoded_height": im["decoded_height"],
                    "image/decoded_width": im["decoded_width"],
                    "image/has_annotations": im["has_annotations"],
                    "objects": {
                        "id": np.asarray([o["id"] for o in objs], np.int64),
                        "bbox": np.asarray([o["bbox"] for o in objs], np.float32).reshape(-1, 4),
                        "label": np.asarray([o["label"] for o in objs], np.int64),
                        "category_id": np.asarray([o["category_id"] for o in objs], np.int64),
                        "is_crowd": np.asarray([o["is_crowd"] for o in objs], np.bool_),
                        "area": np.asarray([o["area"] for o in objs], np.float32),
                        "skip_train": np.asarray([o["skip_train"] for o in objs], np.bool_),
                        "mask": [o["mask"] for o in objs],
                    },
                }

    return CocoInstancesConfig, CocoInstances


_CLASSES = None


def builder_classes():
    """(CocoInstancesConfig, CocoInstances), created once (tfds registers the builder by name)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_builder_classes()
    return _CLASSES


def build(coco_dir: str, out: str | None = None, name: str | None = None, *, with_masks: bool = True,
          skip_bad: bool = False, verify_images: bool = True, splits: Sequence[tuple[str, str, str]] = (),
          num_workers: int = 2):
    """Builds (or reuses) the tfds dataset of a COCO-format directory; returns the tfds builder.

    The dataset lands in ``out/coco_instances/<name>/1.0.0``; ``name`` defaults to the directory's base
    name. An existing version is reused as is (tfds' REUSE_DATASET_IF_EXISTS): delete it to rebuild.
    """
    cfg_cls, builder_cls = builder_classes()
    out = out or default_data_dir()
    name = name or default_name(coco_dir)
    cfg = cfg_cls(name=name, version=VERSION, description=f"COCO-format source {os.path.abspath(coco_dir)}",
                  coco_dir=os.path.abspath(coco_dir), splits=tuple(tuple(s) for s in splits),
                  with_masks=with_masks, skip_bad=skip_bad, verify_images=verify_images,
                  num_workers=num_workers)
    builder = builder_cls(config=cfg, data_dir=out)
    if builder.is_prepared():
        src = (builder.info.metadata or {}).get("source_dir")
        if src and src != os.path.abspath(coco_dir):
            log.warning("reusing %s, which was built from %s, not %s", builder.data_dir, src,
                        os.path.abspath(coco_dir))
        log.info("%s exists: nothing to do", builder.data_dir)
        return builder
    tfds = _tfds()
    builder.download_and_prepare(
        download_dir=os.path.join(out, "downloads"),
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder


def default_data_dir() -> str:
    """``$LIT_JAX_TFDS_DIR``, else ``data/tfds`` under the current directory."""
    return os.environ.get("LIT_JAX_TFDS_DIR", os.path.join("data", "tfds"))


def dataset_dir(data_dir: str, name: str, version: str | None = None) -> str:
    """The directory of a built dataset (latest version when version is None)."""
    root = os.path.join(data_dir, BUILDER_NAME, name)
    hint = (f"build it once with `python -m lit_jax.data.prepare --coco_dir <COCO dir> --out {data_dir} "
            f"--name {name}` (or point data.data_dir / data.dataset at a prepared dataset)")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset {BUILDER_NAME}/{name} is not prepared under {data_dir}: {hint}")
    if version is None:
        versions = sorted((d for d in os.listdir(root) if re.fullmatch(r"\d+\.\d+\.\d+", d)),
                          key=lambda v: tuple(int(x) for x in v.split(".")))
        if not versions:
            raise FileNotFoundError(f"no built version under {root}: {hint}")
        version = versions[-1]
    return os.path.join(root, version)


def load_builder(data_dir: str, name: str, version: str | None = None):
    """A read-only tfds builder of a built dataset (the source directory is not needed)."""
    return _tfds().builder_from_directory(dataset_dir(data_dir, name, version))
