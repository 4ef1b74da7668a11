"""COCO results formatting and evaluation: format, exact agreement with pycocotools, edge cases."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lit_jax.evaluation.coco_eval import (COCO_MAX_DETS, MMDET_MAX_DETS, CocoEvaluator, detections_to_coco,
                                          encode_masks, evaluate_results_file)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode on numpy 2

CAT_IDS = [3, 7]  # non-contiguous: label 0 -> 3 ('cat'), label 1 -> 7 ('dog')
SIZES = {1: (160, 200), 2: (100, 120), 5: (48, 64)}  # image id -> (H, W); image 5 has no annotation


def _rect_poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE (column-major runs, starting with zeros), as crowd annotations store it."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


# (id, image, category, [x, y, w, h], crowd)
GT = [
    (11, 1, 3, [10, 10, 120, 100], 0),   # large cat
    (12, 1, 7, [140, 20, 50, 40], 0),    # medium dog
    (13, 1, 3, [150, 120, 20, 20], 0),   # small cat
    (14, 1, 7, [0, 130, 60, 30], 1),     # crowd dog region (RLE)
    (21, 2, 7, [20, 30, 60, 50], 0),     # medium dog
    (22, 2, 3, [90, 10, 16, 16], 0),     # small cat
]


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco_gt")
    images = [{"id": i, "height": h, "width": w, "file_name": f"{i:012d}.jpg"} for i, (h, w) in SIZES.items()]
    anns = []
    for ann_id, img, cat, (x, y, w, h), crowd in GT:
        ih, iw = SIZES[img]
        if crowd:
            m = np.zeros((ih, iw), np.uint8)
            m[y:y + h, x:x + w] = 1
            seg = _uncompressed_rle(m)
            area = float(m.sum())
        else:
            seg = _rect_poly(x, y, w, h)
            area = float(mask_util.area(mask_util.merge(mask_util.frPyObjects(seg, ih, iw))))
        anns.append({"id": ann_id, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": area,
                     "iscrowd": crowd, "segmentation": seg})
    cats = [{"id": 3, "name": "cat", "supercategory": "animal"}, {"id": 7, "name": "dog", "supercategory": "animal"}]
    path = d / "instances_tiny.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


@pytest.fixture(scope="module")
def gt(gt_file):
    return COCO(gt_file)


def _xyxy(b):
    x, y, w, h = b
    return [x, y, x + w, y + h]


def _pad(rows, k):
    """rows: list of (box xyxy, score, label, mask or None) -> padded (K, ...) arrays with junk invalid slots."""
    boxes = np.full((k, 4), 1e9, np.float32)
    scores = np.full((k,), 0.99, np.float32)
    labels = np.full((k,), 99, np.int32)  # an unknown label: must never be looked up
    valid = np.zeros((k,), bool)
    for i, (b, s, l) in enumerate(r[:3] for r in rows):
        boxes[i], scores[i], labels[i], valid[i] = b, s, l, True
    return boxes, scores, labels, valid


def _gt_mask(gt, ann_id):
    return gt.annToMask(gt.loadAnns([ann_id])[0]).astype(bool)


def _box_mask(img, box):
    h, w = SIZES[img]
    x1, y1, x2, y2 = box
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(_rect_poly(x1, y1, x2 - x1, y2 - y1), h, w))) > 0


def _mixed_detections(gt):
    """Per image: list of (box xyxy, score, label, mask). Perfect, shifted, wrong-class, crowd, duplicate, FP."""
    g = {a: b for a, _, _, b, _ in GT}
    shift = lambda b, dx, dy: [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy]  # noqa: E731
    roll = lambda m, dx, dy: np.roll(np.roll(m, dy, 0), dx, 1)  # noqa: E731
    return {
        1: [
            (_xyxy(g[11]), 0.9, 0, _gt_mask(gt, 11)),                                   # perfect
            (shift(_xyxy(g[12]), 8, 0), 0.7, 1, roll(_gt_mask(gt, 12), 8, 0)),          # shifted
            (shift(_xyxy(g[13]), 3, 3), 0.6, 0, roll(_gt_mask(gt, 13), 3, 3)),          # small, shifted
            (_xyxy(g[14]), 0.95, 1, _box_mask(1, _xyxy(g[14]))),                        # on the crowd region
            (shift(_xyxy(g[11]), 2, 1), 0.3, 0, roll(_gt_mask(gt, 11), 2, 1)),          # duplicate
        ],
        2: [
            (_xyxy(g[21]), 0.8, 1, _gt_mask(gt, 21)),                                   # perfect
            (_xyxy(g[22]), 0.85, 1, _gt_mask(gt, 22)),                                  # wrong class
            # FP whose box is medium (40.25 x 30.25) but whose mask is small (10 x 10): segm_area matters
            ([60.5, 60.25, 100.75, 90.5], 0.95, 0, _box_mask(2, [65, 65, 75, 75])),
        ],
        5: [([5.0, 5.0, 40.0, 30.0], 0.5, 1, _box_mask(5, [5.0, 5.0, 40.0, 30.0]))],  # FP on an empty image
    }


def _perfect_detections(gt):
    out = {i: [] for i in SIZES}
    for ann_id, img, cat, box, crowd in GT:
        if not crowd:
            out[img].append((_xyxy(box), 0.5 + ann_id / 100.0, CAT_IDS.index(cat), _gt_mask(gt, ann_id)))
    return out


def _batches(dets, image_groups, k=6):
    """(image_ids, boxes, scores, labels, valid, masks) batches; masks (K, H, W) per image, zeros in padding."""
    for group in image_groups:
        cols = [_pad(dets[i], k) for i in group]
        masks = []
        for i in group:
            h, w = SIZES[i]
            m = np.zeros((k, h, w), bool)
            for j, row in enumerate(dets[i]):
                m[j] = row[3]
            masks.append(m)
        yield (np.asarray(group), np.stack([c[0] for c in cols]), np.stack([c[1] for c in cols]),
               np.stack([c[2] for c in cols]), np.stack([c[3] for c in cols]), masks)


def _evaluator(gt_file, dets, groups=((1, 2), (5,)), masks=True, **kw):
    ev = CocoEvaluator(gt_file, verbose=False, **kw)
    for ids, boxes, scores, labels, valid, m in _batches(dets, groups):
        ev.add(ids, boxes, scores, labels, valid, CAT_IDS, masks=m if masks else None)
    return ev


def _direct(gt_file, res_file, iou_type, max_dets=MMDET_MAX_DETS, img_ids=None):
    """pycocotools run by hand on a results file, with mmdet 2.11's parameters."""
    cgt = COCO(gt_file)
    cdt = cgt.loadRes(res_file)
    e = COCOeval(cgt, cdt, iou_type)
    e.params.imgIds = cgt.getImgIds() if img_ids is None else list(img_ids)
    e.params.catIds = cgt.getCatIds()
    e.params.maxDets = list(max_dets)
    e.params.iouThrs = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
    e.evaluate()
    e.accumulate()
    e.summarize()
    return e.stats


KEYS = ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"]


# ----------------------------------------------------------------------------------------------------------------
def test_results_format(gt_file, gt, tmp_path):
    dets = _mixed_detections(gt)
    ev = _evaluator(gt_file, dets)
    res = ev.results
    assert len(res) == sum(len(v) for v in dets.values())  # invalid slots skipped (their label 99 is unknown)
    for r in res:
        assert set(r) == {"image_id", "bbox", "score", "category_id", "segmentation"}
        assert type(r["image_id"]) is int and type(r["score"]) is float and type(r["category_id"]) is int
        assert all(type(v) is float for v in r["bbox"]) and len(r["bbox"]) == 4
        assert r["category_id"] in CAT_IDS
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == list(SIZES[r["image_id"]])
    # xywh in original pixels, float32 values kept exactly; grouped by label inside an image.
    img2 = [r for r in res if r["image_id"] == 2]
    assert [r["category_id"] for r in img2] == [3, 7, 7]
    fp = img2[0]
    assert fp["bbox"] == [60.5, 60.25, 100.75 - 60.5, 90.5 - 60.25]
    assert fp["score"] == float(np.float32(0.95))
    # the masks round-trip through the RLE
    perfect = [r for r in res if r["image_id"] == 1 and r["score"] == float(np.float32(0.9))][0]
    np.testing.assert_array_equal(mask_util.decode(perfect["segmentation"]).astype(bool), _gt_mask(gt, 11))
    # write(): valid JSON, same content; the bbox file has no segmentation
    p = ev.write(tmp_path / "out" / "res.json")
    assert json.load(open(p)) == res
    pb = ev.write(tmp_path / "res.bbox.json", iou_type="bbox")
    assert all("segmentation" not in r for r in json.load(open(pb)))


def test_float32_xywh_like_mmdet():
    boxes = np.array([[[10.1, 20.2, 30.3, 45.7]]], np.float32)
    out = detections_to_coco([42], boxes, np.array([[0.123]], np.float32), np.array([[1]]), np.array([[True]]),
                             {0: 5, 1: 9})
    x1, y1, x2, y2 = boxes[0, 0].tolist()
    assert out == [{"image_id": 42, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(np.float32(0.123)),
                    "category_id": 9}]
    with pytest.raises(ValueError, match="label 2"):
        detections_to_coco([1], boxes, [[0.5]], [[2]], [[True]], [3, 7])


def test_mask_input_forms_agree(gt_file, gt):
    """Masks as (K,H,W) arrays, valid-only arrays, lists of 2-D masks and RLEs (bytes counts) give one result."""
    dets = _mixed_detections(gt)
    (ids, boxes, scores, labels, valid, masks), = _batches(dets, [(1, 2)])
    ref = detections_to_coco(ids, boxes, scores, labels, valid, CAT_IDS, masks=masks)
    valid_only = [m[v] for m, v in zip(masks, valid)]
    as_lists = [[mm for mm in m] for m in valid_only]
    as_rle = []
    for m in valid_only:
        rles = [dict(r) for r in mask_util.encode(np.asfortranarray(m.astype(np.uint8).transpose(1, 2, 0)))]
        assert isinstance(rles[0]["counts"], bytes)
        as_rle.append(rles)
    for alt in (valid_only, as_lists, as_rle):
        assert detections_to_coco(ids, boxes, scores, labels, valid, CAT_IDS, masks=alt) == ref
    # per-mask encoding exactly as the brief / mmdet: encode(asfortranarray(mask.astype(uint8)))
    m = masks[0][0]
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    assert encode_masks(m[None])[0] == {"size": r["size"], "counts": r["counts"].decode()}
    with pytest.raises(ValueError, match="masks has"):
        detections_to_coco(ids, boxes, scores, labels, valid, CAT_IDS, masks=[m[:2] for m in masks])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_equals_pycocotools_exactly(gt_file, gt, tmp_path, iou_type):
    ev = _evaluator(gt_file, _mixed_detections(gt))
    res_file = ev.write(tmp_path / f"res.{iou_type}.json", iou_type=iou_type)
    stats = _direct(gt_file, res_file, iou_type)
    out = ev.evaluate(iou_type, ndigits=None)
    np.testing.assert_array_equal(ev.stats[iou_type], stats)
    for i, k in enumerate(KEYS):
        assert out[f"{iou_type}_{k}"] == float(stats[i])
    assert 0.0 < out[f"{iou_type}_mAP"] < 1.0  # a non-trivial case
    # default output: mmdet's 3-decimal rounding and copypaste string
    out3 = ev.evaluate(iou_type)
    assert list(out3) == [f"{iou_type}_{k}" for k in KEYS] + [f"{iou_type}_mAP_copypaste"]
    for i, k in enumerate(KEYS):
        assert out3[f"{iou_type}_{k}"] == float(f"{stats[i]:.3f}")
    assert out3[f"{iou_type}_mAP_copypaste"] == " ".join(f"{v:.3f}" for v in stats[:6])
    # evaluating the file alone gives the same numbers
    assert evaluate_results_file(gt_file, res_file, iou_type, ndigits=None, verbose=False) == out


def test_segm_area_quirk(gt_file, gt, tmp_path):
    """mmdet 2.11 keeps 'bbox' in segm results (det area = box area); segm_area='mask' pops it (mmdet >= 2.12)."""
    ev = _evaluator(gt_file, _mixed_detections(gt))
    dets = [{k: v for k, v in r.items() if k != "bbox"} for r in ev.results]
    p = tmp_path / "segm_nobox.json"
    p.write_text(json.dumps(dets))
    ev.evaluate("segm", segm_area="mask", ndigits=None)
    by_mask = ev.stats["segm"]
    np.testing.assert_array_equal(by_mask, _direct(gt_file, str(p), "segm"))
    ev.evaluate("segm", ndigits=None)  # default: box area, as mmdet 2.11
    by_box = ev.stats["segm"]
    np.testing.assert_array_equal(by_box, _direct(gt_file, ev.write(tmp_path / "segm.json", "segm"), "segm"))
    assert by_box[0] == by_mask[0]  # the overall AP does not depend on it ...
    assert by_box[3] > by_mask[3]  # ... but the small-object AP does: the FP's mask is small, its box is not


def test_standard_maxdets_and_image_subset(gt_file, gt, tmp_path):
    ev = _evaluator(gt_file, _mixed_detections(gt))
    res_file = ev.write(tmp_path / "res.json")
    # plain COCOeval defaults ([1, 10, 100], all images and categories)
    cgt = COCO(gt_file)
    e = COCOeval(cgt, cgt.loadRes(res_file), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    ev.evaluate("bbox", max_dets=COCO_MAX_DETS, metric_items=["mAP", "AR@1", "AR@10", "AR@100"])
    np.testing.assert_array_equal(ev.stats["bbox"], e.stats)
    # a subset of images
    ev.evaluate("bbox", image_ids=[2])
    np.testing.assert_array_equal(ev.stats["bbox"], _direct(gt_file, res_file, "bbox", img_ids=[2]))
    # mmdet's AR items carry the mmdet maxDets
    out = ev.evaluate("bbox", metric_items=["AR@100", "AR@1000", "AR_l@1000"], ndigits=None)
    assert out["bbox_AR@1000"] == float(ev.stats["bbox"][8])
    with pytest.raises(KeyError):
        ev.evaluate("bbox", metric_items=["AR@10"])


def test_perfect_detections_give_ap_one(gt_file, gt):
    ev = _evaluator(gt_file, _perfect_detections(gt))
    out = ev.evaluate(("bbox", "segm"))
    exact = ev.evaluate(("bbox", "segm"), ndigits=None)
    for t in ("bbox", "segm"):
        for k in KEYS:
            assert out[f"{t}_{k}"] == 1.0, (t, k)
            # pycocotools' precision tp / (tp + fp + spacing(1)) sits one ulp-ish below 1
            assert exact[f"{t}_{k}"] == pytest.approx(1.0, abs=1e-12), (t, k)


def test_zero_detections_do_not_crash(gt_file, gt, capsys):
    ev = CocoEvaluator(gt_file, verbose=True)
    empty = np.zeros((1, 0, 4), np.float32)
    ev.add([5], empty, np.zeros((1, 0)), np.zeros((1, 0), np.int32), np.zeros((1, 0), bool), masks=[None])
    assert ev.results == []
    out = ev.evaluate(("bbox", "segm"))
    for t in ("bbox", "segm"):
        for k in KEYS:
            assert out[f"{t}_{k}"] == 0.0  # ground truth exists in every area range: AP 0, not -1
    assert "Average Precision" in capsys.readouterr().out  # the summary table is printed
    # no ground truth at all in the evaluated images: pycocotools' -1
    out = ev.evaluate("bbox", image_ids=[5])
    assert all(out[f"bbox_{k}"] == -1.0 for k in KEYS)
    # all slots invalid behaves the same
    det = detections_to_coco([1], np.ones((1, 3, 4)), np.ones((1, 3)), np.zeros((1, 3), int), np.zeros((1, 3), bool),
                             CAT_IDS)
    assert det == []


def test_classwise_and_errors(gt_file, gt, capsys):
    ev = _evaluator(gt_file, _mixed_detections(gt), masks=False)
    ev.evaluate("bbox", classwise=True, verbose=True)
    text = capsys.readouterr().out
    assert "cat" in text and "dog" in text and "Evaluating bbox" in text
    with pytest.raises(KeyError, match="segm"):
        ev.evaluate("segm")
    with pytest.raises(ValueError, match="not in the annotation file"):
        ev.add([99], np.zeros((1, 1, 4)), np.ones((1, 1)), np.zeros((1, 1), int), np.ones((1, 1), bool))
    with pytest.raises(KeyError):
        ev.evaluate("keypoints")
    # default label table: the file's categories in order
    assert ev.label_to_category_id == CAT_IDS
    ev.reset()
    assert ev.results == [] and ev.stats == {}


def test_proposal_metric(gt_file, gt, tmp_path):
    ev = _evaluator(gt_file, _mixed_detections(gt), masks=False)
    out = ev.evaluate("proposal", ndigits=None)
    assert list(out) == ["AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000"]
    res_file = ev.write(tmp_path / "p.json")
    cgt = COCO(gt_file)
    e = COCOeval(cgt, cgt.loadRes(res_file), "bbox")
    e.params.maxDets = list(MMDET_MAX_DETS)
    e.params.useCats = 0
    e.evaluate()
    e.accumulate()
    e.summarize()
    np.testing.assert_array_equal(ev.stats["proposal"], e.stats)
    assert out["AR@1000"] == float(e.stats[8])


def test_accepts_coco_object_and_dict(gt_file, gt):
    dets = _mixed_detections(gt)
    as_dict = json.load(open(gt_file))
    evs = [_evaluator(src, dets, masks=False) for src in (gt_file, COCO(gt_file), as_dict)]
    a, b, c = (ev.evaluate("bbox", ndigits=None) for ev in evs)
    assert a == b == c
    # all three evaluated exactly the file's ground truth, and the dict passed in was not modified
    assert as_dict == json.load(open(gt_file))
    for ev in evs:  # (COCOeval marks the annotations it reads with 'ignore' / '_ignore')
        anns = [{k: v for k, v in a.items() if k not in ("ignore", "_ignore")} for a in ev.coco.dataset["annotations"]]
        assert anns == as_dict["annotations"]
        assert ev.coco.dataset["images"] == as_dict["images"]
        assert ev.coco.dataset["categories"] == as_dict["categories"]
