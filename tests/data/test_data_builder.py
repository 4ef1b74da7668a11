"""The synthetic COCO generator and the tfds builder: determinism, round trip, bad inputs."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lit_jax.data import coco_builder
from lit_jax.data.coco_builder import CocoFormatError
from lit_jax.data.synthetic import CATEGORIES, make_synthetic_coco


# ----------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------
def test_data_synthetic_is_deterministic(synth_dir, tmp_path):
    make_synthetic_coco(str(tmp_path / "a"), num_train=4, num_val=1, seed=0)
    make_synthetic_coco(str(tmp_path / "b"), num_train=4, num_val=1, seed=1)
    ja = json.load(open(tmp_path / "a/annotations/instances_train2017.json"))
    j0 = json.load(open(os.path.join(synth_dir, "annotations/instances_train2017.json")))
    jb = json.load(open(tmp_path / "b/annotations/instances_train2017.json"))
    # same seed: the 4-image set is a prefix of the 12-image one, byte for byte
    assert ja["images"] == j0["images"][:4]
    assert ja["annotations"] == [a for a in j0["annotations"] if a["image_id"] <= 4]
    for im in ja["images"]:
        a = open(tmp_path / "a/train2017" / im["file_name"], "rb").read()
        assert a == open(os.path.join(synth_dir, "train2017", im["file_name"]), "rb").read()
    assert jb["annotations"] != ja["annotations"]


def test_data_synthetic_contents(synth_dir):
    coco = COCO(os.path.join(synth_dir, "annotations/instances_train2017.json"))
    anns = coco.dataset["annotations"]
    assert [c["id"] for c in coco.dataset["categories"]] == [c["id"] for c in CATEGORIES]
    assert {a["category_id"] for a in anns} == {c["id"] for c in CATEGORIES}
    kinds = {("crowd" if a["iscrowd"] else "poly" if isinstance(a["segmentation"], list) else "rle")
             for a in anns}
    assert kinds == {"crowd", "poly", "rle"}
    crowd = [a for a in anns if a["iscrowd"]]
    assert all(isinstance(a["segmentation"]["counts"], list) for a in crowd)  # uncompressed, like COCO
    ims = coco.dataset["images"]
    per_img = {im["id"]: [a for a in anns if a["image_id"] == im["id"]] for im in ims}
    assert any(not v for v in per_img.values())                                        # empty image
    assert any(v and all(a["iscrowd"] for a in v) for v in per_img.values())           # crowd only
    assert any(im["height"] > im["width"] for im in ims)                                # portrait
    assert any(min(im["width"], im["height"]) < 32 for im in ims)                       # tiny
    assert len({(im["width"], im["height"]) for im in ims}) >= 5
    # masks agree with boxes and areas (visible part, COCO-style)
    for a in anns:
        m = coco.annToMask(a)
        assert m.sum() == a["area"] > 0
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert xs.min() >= np.floor(x) - 1 and xs.max() <= x + w + 1
        assert ys.min() >= np.floor(y) - 1 and ys.max() <= y + h + 1
    # some overlapping objects
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns if not a["iscrowd"]])
    img_of = np.array([a["image_id"] for a in anns if not a["iscrowd"]])
    overl = 0
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if img_of[i] == img_of[j]:
                iw = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
                ih = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
                overl += iw > 0 and ih > 0
    assert overl > 0


# ----------------------------------------------------------------------------------------------------
# Builder round trip
# ----------------------------------------------------------------------------------------------------
def test_data_builder_round_trip(synth_dir, built):
    data_dir, name = built
    b = coco_builder.load_builder(data_dir, name)
    md = b.info.metadata
    assert md["category_ids"] == [c["id"] for c in CATEGORIES]
    assert md["category_names"] == [c["name"] for c in CATEGORIES]
    assert set(b.info.splits) == {"train", "val"}
    for split, stem in [("train", "train2017"), ("val", "val2017")]:
        n = len(json.load(open(os.path.join(synth_dir, f"annotations/instances_{stem}.json")))["images"])
        assert b.info.splits[split].num_examples == n
    import tensorflow_datasets as tfds
    for split, stem in [("train", "train2017"), ("val", "val2017")]:
        coco = COCO(os.path.join(synth_dir, f"annotations/instances_{stem}.json"))
        seen = set()
        ds = b.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        for e in tfds.as_numpy(ds):
            iid = int(e["image/id"])
            seen.add(iid)
            info = coco.imgs[iid]
            assert e["image/filename"].decode() == info["file_name"]
            assert (e["image/width"], e["image/height"]) == (info["width"], info["height"])
            assert (e["image/decoded_width"], e["image/decoded_height"]) == (info["width"], info["height"])
            assert e["image"] == open(os.path.join(synth_dir, stem, info["file_name"]), "rb").read()
            anns = coco.loadAnns(coco.getAnnIds(imgIds=iid))
            o = e["objects"]
            assert e["image/has_annotations"] == bool(anns)
            assert o["id"].tolist() == [a["id"] for a in anns]
            exp = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                             a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32).reshape(-1, 4)
            np.testing.assert_array_equal(o["bbox"], exp)
            assert o["category_id"].tolist() == [a["category_id"] for a in anns]
            assert [md["category_ids"][k] for k in o["label"]] == [a["category_id"] for a in anns]
            assert o["is_crowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
            np.testing.assert_array_equal(o["area"], np.array([a["area"] for a in anns], np.float32))
            for a, rle in zip(anns, o["mask"]):
                got = mask_utils.decode({"size": [info["height"], info["width"]], "counts": rle})
                ref = coco.annToMask(a)
                assert mask_utils.iou([mask_utils.encode(np.asfortranarray(got))],
                                      [mask_utils.encode(np.asfortranarray(ref))], [0])[0, 0] == 1.0
                np.testing.assert_array_equal(got, ref)
        assert seen == set(coco.imgs)


def test_data_builder_rebuild_is_noop(synth_dir, built, caplog):
    data_dir, name = built
    d = coco_builder.dataset_dir(data_dir, name)
    before = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}
    with caplog.at_level(logging.INFO, logger="lit_jax.data.coco_builder"):
        coco_builder.build(synth_dir, data_dir, name)
    assert "nothing to do" in caplog.text
    assert {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)} == before


def test_data_discover_splits(synth_dir):
    assert coco_builder.discover_splits(synth_dir) == (
        ("train", "annotations/instances_train2017.json", "train2017"),
        ("val", "annotations/instances_val2017.json", "val2017"))


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def _small_copy(synth_dir, dst, n_images=3):
    """A 3-image train split (images 1..3 of the synthetic set) in a fresh directory."""
    os.makedirs(os.path.join(dst, "annotations"))
    os.makedirs(os.path.join(dst, "train2017"))
    doc = json.load(open(os.path.join(synth_dir, "annotations/instances_train2017.json")))
    doc["images"] = doc["images"][:n_images]
    ids = {im["id"] for im in doc["images"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in ids]
    for im in doc["images"]:
        shutil.copy(os.path.join(synth_dir, "train2017", im["file_name"]), os.path.join(dst, "train2017"))
    _write(dst, doc)
    return doc


def _write(dst, doc):
    with open(os.path.join(dst, "annotations/instances_train2017.json"), "w") as f:
        json.dump(doc, f)


def _parse(dst, **kw):
    return coco_builder.parse_split(dst, "annotations/instances_train2017.json", "train2017", **kw)


def _poly_ann(doc):
    return next(a for a in doc["annotations"] if isinstance(a["segmentation"], list) and not a["iscrowd"])


BAD_CASES = {
    "zero_box": ("bad_box", "zero or negative size", lambda d: _poly_ann(d)["bbox"].__setitem__(2, 0.0)),
    "negative_box": ("bad_box", "zero or negative size", lambda d: _poly_ann(d)["bbox"].__setitem__(3, -4.0)),
    "two_point_polygon": ("bad_mask", "fewer than 3 points",
                          lambda d: _poly_ann(d).__setitem__("segmentation", [[1.0, 2.0, 30.0, 40.0]])),
    "missing_bbox": ("ann_field", "'bbox'", lambda d: _poly_ann(d).pop("bbox")),
    "missing_area": ("ann_field", "'area'", lambda d: _poly_ann(d).pop("area")),
    "unknown_category": ("ann_field", "unknown category_id", lambda d: _poly_ann(d).__setitem__("category_id", 3)),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_data_bad_annotation_errors_or_is_counted(synth_dir, tmp_path, case, caplog):
    kind, msg, corrupt = BAD_CASES[case]
    dst = str(tmp_path / "c")
    doc = _small_copy(synth_dir, dst)
    ann = _poly_ann(doc)
    aid, iid = ann["id"], ann["image_id"]
    fname = next(im["file_name"] for im in doc["images"] if im["id"] == iid)
    corrupt(doc)
    _write(dst, doc)
    with pytest.raises(CocoFormatError) as err:
        _parse(dst)
    text = str(err.value)
    assert msg in text and f"annotation id {aid}" in text and fname in text
    assert "instances_train2017.json" in text
    with caplog.at_level(logging.WARNING, logger="lit_jax.data.coco_builder"):
        parsed = _parse(dst, skip_bad=True)
    assert parsed.skipped == {kind: {"images": 0, "annotations": 1}}
    assert "skipped bad entries" in caplog.text and kind in caplog.text
    kept = [o["id"] for im in parsed.images for o in im["objects"]]
    assert aid not in kept and len(kept) == len(doc["annotations"]) - 1


def test_data_bad_json_and_missing_fields(synth_dir, tmp_path):
    dst = str(tmp_path / "c")
    doc = _small_copy(synth_dir, dst)
    path = os.path.join(dst, "annotations/instances_train2017.json")
    with open(path, "w") as f:
        f.write('{"images": [')
    for skip in (False, True):  # a file that does not parse cannot be skipped
        with pytest.raises(CocoFormatError, match="instances_train2017.json: not valid JSON"):
            _parse(dst, skip_bad=skip)
    doc2 = dict(doc)
    doc2.pop("annotations")
    _write(dst, doc2)
    with pytest.raises(CocoFormatError, match="required field 'annotations'"):
        _parse(dst, skip_bad=True)
    doc3 = json.loads(json.dumps(doc))
    doc3["images"][1].pop("width")
    _write(dst, doc3)
    with pytest.raises(CocoFormatError, match=r"images\[1\].*width"):
        _parse(dst)
    parsed = _parse(dst, skip_bad=True)
    n_anns_img1 = sum(a["image_id"] == doc["images"][1]["id"] for a in doc["annotations"])
    assert parsed.skipped == {"image_field": {"images": 1, "annotations": n_anns_img1}}
    assert len(parsed.images) == 2


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_data_bad_image_errors_or_is_counted(synth_dir, tmp_path, problem, caplog):
    dst = str(tmp_path / "c")
    doc = _small_copy(synth_dir, dst)
    im = doc["images"][1]
    path = os.path.join(dst, "train2017", im["file_name"])
    if problem == "missing":
        os.remove(path)
    else:
        with open(path, "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out = str(tmp_path / "tfds")
    with pytest.raises(CocoFormatError) as err:
        coco_builder.build(dst, out, "bad")
    assert im["file_name"] in str(err.value) and f"id {im['id']}" in str(err.value)
    with caplog.at_level(logging.WARNING):
        b = coco_builder.build(dst, out, "bad_skipped", skip_bad=True)
    kind = "missing_image" if problem == "missing" else "corrupt_image"
    info = b.info.metadata["splits"]["train"]
    n_anns = sum(a["image_id"] == im["id"] for a in doc["annotations"])
    assert info["skipped"] == {kind: {"images": 1, "annotations": n_anns}} and n_anns > 0
    assert info["num_images_in"] == 3 and info["num_annotations_in"] == len(doc["annotations"])
    assert info["num_images"] + 1 == 3 and info["num_annotations"] + n_anns == len(doc["annotations"])
    assert b.info.splits["train"].num_examples == 2
    assert im["file_name"] in caplog.text or "do not decode" in caplog.text
    if problem == "corrupt":  # not verified at build time: the pipeline's decode names the file
        coco_builder.build(dst, out, "unverified", verify_images=False)
        from lit_jax.data import pipeline as P
        cfg = P.DataConfig(data_dir=out, dataset="coco_instances/unverified", img_scale=(384, 256),
                           eval_split="train")
        ev = P.make_eval_dataset(cfg, process_index=0, process_count=1, mode="per_image")
        with pytest.raises(Exception, match=im["file_name"]):
            for _ in ev.numpy_batches():
                pass


def _verified(dst, **kw):
    parsed = _parse(dst, **kw)
    coco_builder.verify_images(parsed, skip_bad=kw.get("skip_bad", False), num_workers=1, progress=False)
    return parsed


def _assert_accounted(parsed, doc):
    """Images and annotations in = out + counted skips (summed over the reasons)."""
    out_anns = sum(len(im["objects"]) for im in parsed.images)
    assert parsed.num_images_in == len(doc["images"])
    assert parsed.num_annotations_in == len(doc["annotations"])
    assert len(doc["images"]) == len(parsed.images) + sum(c["images"] for c in parsed.skipped.values())
    assert len(doc["annotations"]) == out_anns + sum(c["annotations"] for c in parsed.skipped.values())


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment holding only IFD0's Orientation tag (little-endian TIFF)."""
    ifd = (b"\x01\x00" + (0x0112).to_bytes(2, "little") + (3).to_bytes(2, "little")
           + (1).to_bytes(4, "little") + orientation.to_bytes(2, "little") + b"\x00\x00" + b"\x00" * 4)
    payload = b"Exif\x00\x00" + b"II*\x00" + (8).to_bytes(4, "little") + ifd
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


@pytest.mark.parametrize("json_size", ["doubled", "transposed_without_exif"])
def test_data_image_size_mismatch_errors_or_is_counted(synth_dir, tmp_path, json_size):
    dst = str(tmp_path / "c")
    doc = _small_copy(synth_dir, dst)
    im = doc["images"][1]  # 640 x 480 on disk
    w, h = im["width"], im["height"]
    im["width"], im["height"] = (2 * w, 2 * h) if json_size == "doubled" else (h, w)
    _write(dst, doc)
    with pytest.raises(CocoFormatError) as err:
        _verified(dst, with_masks=False)
    text = str(err.value)
    assert im["file_name"] in text and f"id {im['id']}" in text
    assert f"{h} x {w}" in text and f"{im['height']} x {im['width']}" in text
    parsed = _verified(dst, skip_bad=True, with_masks=False)
    n_anns = sum(a["image_id"] == im["id"] for a in doc["annotations"])
    assert parsed.skipped == {"size_mismatch": {"images": 1, "annotations": n_anns}}
    assert im["id"] not in [i["id"] for i in parsed.images]
    _assert_accounted(parsed, doc)


def test_data_exif_rotated_image_is_accepted(synth_dir, tmp_path):
    dst = str(tmp_path / "c")
    doc = _small_copy(synth_dir, dst)
    im = doc["images"][1]
    path = os.path.join(dst, "train2017", im["file_name"])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(_with_exif_orientation(data, 6))  # rotate 90 degrees clockwise
    assert coco_builder.exif_orientation(open(path, "rb").read()) == 6
    parsed = coco_builder.parse_split(dst, "annotations/instances_train2017.json", "train2017")
    _, rotated = coco_builder.verify_images(parsed, skip_bad=False, num_workers=1, progress=False)
    assert rotated == [im["id"]] and parsed.skipped == {}
    got = next(i for i in parsed.images if i["id"] == im["id"])
    assert (got["decoded_height"], got["decoded_width"]) == (im["width"], im["height"])


def test_data_skip_bad_accounts_for_every_image_and_annotation(synth_dir, tmp_path):
    """Several bad images at once: per reason, images and annotations in = out + counted."""
    dst = str(tmp_path / "c")
    doc = _small_copy(synth_dir, dst)
    n_of = {im["id"]: sum(a["image_id"] == im["id"] for a in doc["annotations"]) for im in doc["images"]}
    with open(os.path.join(dst, "train2017", doc["images"][0]["file_name"]), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")  # image 1: does not decode
    dup = dict(doc["images"][2], file_name=doc["images"][1]["file_name"])  # image 3's id used twice
    doc["images"].append(dup)
    doc["annotations"].append(dict(_poly_ann(doc), id=10_000, image_id=12345))  # no such image
    _write(dst, doc)
    with pytest.raises(CocoFormatError, match=r"image id 3 is used by 2 image entries"):
        _parse(dst)
    parsed = _verified(dst, skip_bad=True)
    assert parsed.skipped == {
        "corrupt_image": {"images": 1, "annotations": n_of[1]},
        "duplicate_image_id": {"images": 2, "annotations": n_of[3]},
        "ann_field": {"images": 0, "annotations": 1}}
    assert [im["id"] for im in parsed.images] == [2]
    _assert_accounted(parsed, doc)


def test_data_unverified_size_mismatch_fails_in_the_train_pipeline(synth_dir, tmp_path):
    """Built with verify_images=False, the mismatch is caught when the image is decoded, naming the file."""
    import tensorflow as tf
    from lit_jax.data import pipeline as P
    dst = str(tmp_path / "c")
    doc = _small_copy(synth_dir, dst)
    for im in doc["images"]:  # every image is doubled: whichever comes first must fail
        im["width"], im["height"] = 2 * im["width"], 2 * im["height"]
    _write(dst, doc)
    out = str(tmp_path / "tfds")
    coco_builder.build(dst, out, "unverified", verify_images=False, with_masks=False)
    cfg = P.DataConfig(data_dir=out, dataset="coco_instances/unverified", img_scale=(384, 256),
                       global_batch_size=1, shuffle=False, min_size=0)
    td = P.make_train_dataset(cfg, process_index=0, process_count=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"size_mismatch: image.*\.jpg"):
        next(iter(td.numpy_batches()))
