"""The tf.data pipeline on the synthetic dataset at a small scale (384x256 -> canvases 256x384 / 384x256)."""
import collections
import logging
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lit_jax.data import pipeline as P
from lit_jax.data import sources
from lit_jax.data import transforms as T

SCALE = (384, 256)
CANVASES = ((256, 384), (384, 256))


def _cfg(built, **kw):
    data_dir, name = built
    base = dict(data_dir=data_dir, dataset=f"coco_instances/{name}", img_scale=SCALE, global_batch_size=2,
                eval_global_batch_size=4, max_instances=8, mask_size=16, shuffle_buffer=16, seed=3)
    base.update(kw)
    return P.DataConfig(**base)


def _coco(synth_dir, stem="train2017"):
    return COCO(os.path.join(synth_dir, f"annotations/instances_{stem}.json"))


def _mmdet_train_ids(coco):
    """mmdet CocoDataset._filter_imgs: any annotation of a known class, and min(w, h) >= 32."""
    with_ann = {a["image_id"] for a in coco.dataset["annotations"]}
    return {i for i, im in coco.imgs.items() if i in with_ann and min(im["width"], im["height"]) >= 32}


@pytest.fixture(scope="module")
def two_epochs(built):
    """All batches of 2 epochs, batch 2, with masks."""
    td = P.make_train_dataset(_cfg(built, with_masks=True), process_index=0, process_count=1, num_epochs=2)
    return td, list(td.numpy_batches())


def test_data_train_static_shapes_and_layout(two_epochs):
    td, batches = two_epochs
    assert P.DataConfig().resolved_canvases() == ((800, 1344), (1344, 800))
    assert [b.canvas for b in td.buckets] == list(CANVASES)
    assert len(batches) == 2 * td.steps_per_epoch
    seen_canvases = set()
    for b in batches:
        hc, wc = b["images"].shape[1:3]
        assert (hc, wc) in CANVASES
        seen_canvases.add((hc, wc))
        spec = {
            "images": ((2, hc, wc, 3), np.float32), "gt_boxes": ((2, 8, 4), np.float32),
            "gt_labels": ((2, 8), np.int32), "gt_valid": ((2, 8), np.bool_),
            "gt_masks": ((2, 8, 16, 16), np.uint8), "img_shape": ((2, 2), np.int32),
            "pad_shape": ((2, 2), np.int32), "scale_factor": ((2, 4), np.float32),
            "image_id": ((2,), np.int32), "ori_shape": ((2, 2), np.int32), "flipped": ((2,), np.bool_),
        }
        assert set(b) == set(spec)
        for k, (shape, dtype) in spec.items():
            assert b[k].shape == shape and b[k].dtype == dtype, k
        assert (b["pad_shape"] % 32 == 0).all()
        assert (b["pad_shape"] >= b["img_shape"]).all() and (b["pad_shape"] <= [hc, wc]).all()
        assert np.all(b["gt_labels"][~b["gt_valid"]] == -1) and not b["gt_boxes"][~b["gt_valid"]].any()
        assert set(np.unique(b["gt_masks"])) <= {0, 1}
    assert seen_canvases == set(CANVASES)


def test_data_two_epochs_cover_every_training_image(synth_dir, built, two_epochs):
    td, batches = two_epochs
    expected = _mmdet_train_ids(_coco(synth_dir))
    counts = collections.Counter(int(i) for b in batches for i in b["image_id"])
    assert set(counts) == expected
    assert sum(counts.values()) == 2 * td.steps_per_epoch * 2
    assert all(c in (2, 3) for c in counts.values())  # 2, or 3 where a bucket is odd-sized
    # with a batch that divides every bucket: exactly twice
    td1 = P.make_train_dataset(_cfg(built, global_batch_size=1), process_index=0, process_count=1, num_epochs=2)
    c1 = collections.Counter(int(i) for b in td1.numpy_batches() for i in b["image_id"])
    assert set(c1) == expected and set(c1.values()) == {2}
    assert td1.stats["dropped_no_annotations"] == 1 and td1.stats["dropped_small"] == 1
    assert td1.stats["crowd_or_skipped_only"] == 1


def test_data_deterministic_given_seed(built):
    def run(seed):
        td = P.make_train_dataset(_cfg(built, seed=seed), process_index=0, process_count=1, num_epochs=1)
        return [(b["image_id"].tolist(), b["flipped"].tolist(), float(b["images"].sum())) for b in td.numpy_batches()]
    a, b, c = run(3), run(3), run(4)
    assert a == b
    assert a != c
    flips = [f for _, fs, _ in a for f in fs]
    assert any(flips) and not all(flips)


def _mmdet_reference(data, im, anns, cat_ids, flip, canvas, m):
    """mmdet 2.11's train pipeline on one image, in numpy/cv2/pycocotools."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    nw, nh = T.rescale_size(w, h, SCALE)
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    sf = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    boxes, labels, masks = [], [], []
    for a in anns:  # CocoDataset._parse_ann_info
        x1, y1, bw, bh = a["bbox"]
        iw = max(0, min(x1 + bw, im["width"]) - max(x1, 0))
        ih = max(0, min(y1 + bh, im["height"]) - max(y1, 0))
        if a.get("ignore") or iw * ih == 0 or a["area"] <= 0 or bw < 1 or bh < 1 or a["iscrowd"]:
            continue
        boxes.append([x1, y1, x1 + bw, y1 + bh])
        labels.append(cat_ids.index(a["category_id"]))
        seg = a["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, im["height"], im["width"]))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, im["height"], im["width"])
        else:
            rle = seg
        masks.append(cv2.resize(mask_utils.decode(rle), T.rescale_size(im["width"], im["height"], SCALE),
                                interpolation=cv2.INTER_NEAREST))
    boxes = np.array(boxes, np.float32).reshape(-1, 4) * sf
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, nw)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, nh)
    if flip:
        img = img[:, ::-1]
        boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
        masks = [mk[:, ::-1] for mk in masks]
    img = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_BGR2RGB)
    img = (img - np.float32(T.MEAN_RGB)) * (1 / np.float64(T.STD_RGB)).astype(np.float32)
    out = np.zeros(canvas + (3,), np.float32)
    out[:nh, :nw] = img
    ph, pw = T.ceil_to(nh, 32), T.ceil_to(nw, 32)
    crops = []
    for mk, bx in zip(masks, boxes):
        padded = np.zeros((ph, pw), np.float32)
        padded[:mk.shape[0], :mk.shape[1]] = mk
        crops.append(T.roi_align_np(padded, bx, m) >= 0.5)
    return out, boxes, np.array(labels), np.array(crops).reshape(-1, m, m), (nh, nw), sf


def test_data_batches_equal_mmdet_reference(synth_dir, built, two_epochs):
    _, batches = two_epochs
    coco = _coco(synth_dir)
    cat_ids = [c["id"] for c in coco.dataset["categories"]]
    checked = set()
    for b in batches:
        for k in range(len(b["image_id"])):
            iid, flip = int(b["image_id"][k]), bool(b["flipped"][k])
            if (iid, flip) in checked:
                continue
            checked.add((iid, flip))
            im = coco.imgs[iid]
            data = open(os.path.join(synth_dir, "train2017", im["file_name"]), "rb").read()
            canvas = b["images"].shape[1:3]
            img, boxes, labels, crops, img_shape, sf = _mmdet_reference(
                data, im, coco.imgToAnns[iid], cat_ids, flip, tuple(canvas), 16)
            np.testing.assert_array_equal(b["images"][k], img)
            n = len(boxes)
            assert b["gt_valid"][k].sum() == n
            np.testing.assert_array_equal(b["gt_boxes"][k][:n], boxes)
            np.testing.assert_array_equal(b["gt_labels"][k][:n], labels)
            assert tuple(b["img_shape"][k]) == img_shape and tuple(b["ori_shape"][k]) == (im["height"], im["width"])
            np.testing.assert_array_equal(b["scale_factor"][k], sf)
            np.testing.assert_array_equal(b["gt_masks"][k][:n], crops.astype(np.uint8))
    assert any(f for _, f in checked) and any(not f for _, f in checked)


def test_data_crowd_only_image_has_no_targets(synth_dir, two_epochs):
    _, batches = two_epochs
    coco = _coco(synth_dir)
    crowd_only = [i for i in coco.imgs if coco.imgToAnns[i] and all(a["iscrowd"] for a in coco.imgToAnns[i])]
    assert crowd_only
    for b in batches:
        for k, iid in enumerate(b["image_id"]):
            if iid in crowd_only:
                assert not b["gt_valid"][k].any()


def test_data_max_instances_truncates_with_a_logged_count(built, caplog):
    td = P.make_train_dataset(_cfg(built, max_instances=2, global_batch_size=1, shuffle=False),
                              process_index=0, process_count=1, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="lit_jax.data.pipeline"):
        batches = list(td.numpy_batches())
    assert all(b["gt_valid"].sum() <= 2 for b in batches)
    index = td.source.index("train")
    expected = int(np.maximum(index["num_train_instances"] - 2, 0)[
        np.isin(index["image_id"], [int(b["image_id"][0]) for b in batches])].sum())
    assert expected > 0
    assert "more GT instances than max_instances" in caplog.text
    assert f"so far {expected} instances" in caplog.text


def test_data_eval_every_image_once_padded(synth_dir, built):
    coco = _coco(synth_dir, "val2017")
    ev = P.make_eval_dataset(_cfg(built), process_index=0, process_count=1)
    batches = list(ev.numpy_batches())
    assert len(batches) == ev.num_steps
    ids = [int(i) for b in batches for i, v in zip(b["image_id"], b["valid"]) if v]
    assert sorted(ids) == sorted(coco.imgs)
    assert sum((~b["valid"]).sum() for b in batches) == ev.num_steps * 4 - len(coco.imgs)
    for b in batches:
        assert b["images"].shape[0] == 4 and b["images"].shape[1:3] in CANVASES
        assert not b["images"][~b["valid"]].any() and (b["image_id"][~b["valid"]] == -1).all()
        for k in np.flatnonzero(b["valid"]):
            im = coco.imgs[int(b["image_id"][k])]
            nw, nh = T.rescale_size(im["width"], im["height"], SCALE)
            assert tuple(b["ori_shape"][k]) == (im["height"], im["width"])
            assert tuple(b["img_shape"][k]) == (nh, nw)
            np.testing.assert_array_equal(b["scale_factor"][k], np.float32([nw / im["width"], nh / im["height"]] * 2))
    # per-image mode: each image at its own 32-padded shape, batch 1
    pi = list(P.make_eval_dataset(_cfg(built), process_index=0, process_count=1, mode="per_image").numpy_batches())
    assert sorted(int(b["image_id"][0]) for b in pi) == sorted(coco.imgs)
    for b in pi:
        assert b["images"].shape[1:3] == tuple(b["pad_shape"][0])


def test_data_two_processes_read_disjoint_halves(synth_dir, built):
    expected = _mmdet_train_ids(_coco(synth_dir))
    got, steps = [], []
    for p in range(2):
        td = P.make_train_dataset(_cfg(built, global_batch_size=2), process_index=p, process_count=2, num_epochs=1)
        assert td.local_batch_size == 1
        batches = list(td.numpy_batches())
        steps.append((len(batches), [b["images"].shape for b in batches]))
        got.append({int(i) for b in batches for i in b["image_id"]})
    assert got[0].isdisjoint(got[1]) and got[0] | got[1] == expected
    assert steps[0] == steps[1]  # same number of steps and the same canvas at each step on both hosts
    val = set(_coco(synth_dir, "val2017").imgs)
    ev = []
    for p in range(2):
        e = P.make_eval_dataset(_cfg(built), process_index=p, process_count=2)
        bs = list(e.numpy_batches())
        ev.append(([int(i) for b in bs for i, v in zip(b["image_id"], b["valid"]) if v],
                   [b["images"].shape for b in bs]))
    assert set(ev[0][0]).isdisjoint(ev[1][0]) and set(ev[0][0]) | set(ev[1][0]) == val
    assert len(ev[0][0]) + len(ev[1][0]) == len(val) and ev[0][1] == ev[1][1]


def test_data_tfds_coco_2017_reader_path(synth_dir, tmp_path):
    """tfds' coco/2017 layout (normalised BBoxFeature, ClassLabel, int area, no masks), box-only."""
    import tensorflow_datasets as tfds

    class Adhoc(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
        code_path = None  # tfds 4.9.10's needs the importlib_resources backport (absent on Python >= 3.9)
    coco = _coco(synth_dir)
    names = [c["name"] for c in coco.dataset["categories"]]
    cat_ids = [c["id"] for c in coco.dataset["categories"]]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(names=names), "is_crowd": np.bool_}),
    })

    def examples():
        for iid, im in coco.imgs.items():
            h, w = im["height"], im["width"]
            yield iid, {
                "image": os.path.join(synth_dir, "train2017", im["file_name"]),
                "image/filename": im["file_name"], "image/id": iid,
                "objects": [{"id": a["id"], "area": int(a["area"]), "is_crowd": bool(a["iscrowd"]),
                             "label": cat_ids.index(a["category_id"]),
                             "bbox": tfds.features.BBox(ymin=a["bbox"][1] / h, xmin=a["bbox"][0] / w,
                                                        ymax=(a["bbox"][1] + a["bbox"][3]) / h,
                                                        xmax=(a["bbox"][0] + a["bbox"][2]) / w)}
                            for a in coco.imgToAnns[iid]],
            }

    fake = str(tmp_path / "fake")
    Adhoc(name="coco", version="1.1.0", features=features, config="2017",
          split_datasets={"train": list(examples())}, data_dir=fake).download_and_prepare()
    src = sources.open_source(fake, "coco/2017")
    assert src.category_names == names and not src.with_masks
    for e in src.records("train").as_numpy_iterator():
        anns = coco.imgToAnns[int(e["image_id"])]
        exp = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                        for a in anns], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(e["boxes"], exp, atol=1e-3)
        assert e["is_crowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
    cfg = P.DataConfig(data_dir=fake, dataset="coco/2017", img_scale=SCALE, global_batch_size=1, max_instances=8)
    td = P.make_train_dataset(cfg, process_index=0, process_count=1, num_epochs=1)
    ids = {int(b["image_id"][0]) for b in td.numpy_batches()}
    assert ids == _mmdet_train_ids(coco)
    with pytest.raises(ValueError, match="no masks"):
        P.make_train_dataset(P.DataConfig(**{**cfg.__dict__, "with_masks": True}), process_index=0,
                             process_count=1)
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        sources.open_source(str(tmp_path / "nothing"), "coco/2017")


def test_data_config_from_dict():
    cfg = P.DataConfig.from_dict({"img_scale": [512, 320], "canvases": [[320, 512], [512, 320]], "seed": 1})
    assert cfg.img_scale == (512, 320) and cfg.resolved_canvases() == ((320, 512), (512, 320))
    with pytest.raises(ValueError, match="unknown"):
        P.DataConfig.from_dict({"nope": 1})


def test_data_iterator_checkpoint_resumes_exactly(built, tmp_path):
    """tf.train.Checkpoint(iterator=...) saves and restores the train stream (the trainer relies on it)."""
    import tensorflow as tf
    cfg = _cfg(built, with_masks=True)

    def make():
        return iter(P.make_train_dataset(cfg, process_index=0, process_count=1).dataset)
    it = make()
    for _ in range(3):
        next(it)
    path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "it"))
    ref = [next(it) for _ in range(3)]
    it2 = make()
    tf.train.Checkpoint(iterator=it2).read(path).assert_consumed()
    for r in ref:
        g = next(it2)
        for k in r:
            np.testing.assert_array_equal(g[k].numpy(), r[k].numpy())
