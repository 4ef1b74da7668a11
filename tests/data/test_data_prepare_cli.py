"""`python -m lit_jax.data.prepare`: bad input gives one `error: ...` line and exit code 1, no traceback."""
import json
import os
import shutil

import pytest

from lit_jax.data import prepare


def _copy(synth_dir, tmp_path):
    dst = str(tmp_path / "src")
    shutil.copytree(synth_dir, dst)
    os.remove(os.path.join(dst, "annotations/instances_val2017.json"))  # one split is enough
    return dst


def _error_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err  # (tqdm's progress bar also goes to stderr)
    return lines[0]


def test_data_prepare_missing_coco_dir(tmp_path, capsys):
    assert prepare.main(["--coco_dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    assert "nope" in _error_line(capsys)


@pytest.mark.parametrize("problem", ["no_json", "bad_json", "corrupt_image"])
def test_data_prepare_bad_input_is_one_error_line(synth_dir, tmp_path, capsys, problem):
    src = _copy(synth_dir, tmp_path)
    ann = os.path.join(src, "annotations/instances_train2017.json")
    doc = json.load(open(ann))
    named = "instances_train2017.json"
    if problem == "no_json":
        os.remove(ann)
        args = ["--split", "train=annotations/instances_train2017.json:train2017"]
    elif problem == "bad_json":
        open(ann, "w").write('{"images": [')
        args = []
    else:
        named = doc["images"][0]["file_name"]
        open(os.path.join(src, "train2017", named), "wb").write(b"not an image")
        args = []
    assert prepare.main(["--coco_dir", src, "--out", str(tmp_path / "out"), *args]) == 1
    assert named in _error_line(capsys)


def test_data_prepare_report_counts_images_and_annotations(synth_dir, tmp_path, capsys):
    src = _copy(synth_dir, tmp_path)
    doc = json.load(open(os.path.join(src, "annotations/instances_train2017.json")))
    im = doc["images"][0]
    n_anns = sum(a["image_id"] == im["id"] for a in doc["annotations"])
    open(os.path.join(src, "train2017", im["file_name"]), "wb").write(b"not an image")
    assert prepare.main(["--coco_dir", src, "--out", str(tmp_path / "out"), "--skip_bad", "--no_masks"]) == 0
    out = capsys.readouterr().out
    n_im, n_ann = len(doc["images"]), len(doc["annotations"])
    assert (f"train: {n_im - 1} images, {n_ann - n_anns} annotations kept (of {n_im} / {n_ann} in the JSON); "
            f"skipped corrupt_image: 1 images, {n_anns} annotations") in out
