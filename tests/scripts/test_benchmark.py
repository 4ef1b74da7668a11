"""scripts/benchmark.py end to end on small inputs: records, the torch comparison, the switches as overrides."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TI = os.path.join(ROOT, "configs", "retinanet_lit_ti_fpn_1x_coco.py")


def _script():
    spec = importlib.util.spec_from_file_location("lit_benchmark", os.path.join(ROOT, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_backbone_against_torch_writes_comparable_records(tmp_path, capsys):
    out = str(tmp_path / "results.jsonl")
    rc = _script().main(["--config", TI, "--mode", "backbone", "--size", "64x96", "--steps", "2", "--warmup", "1",
                         "--compare-torch", "--out", out, "--config.model.backbone_args.attention_query_chunk=16"])
    assert rc == 0
    recs = _records(out)
    assert [r["framework"] for r in recs] == ["jax", "jax", "torch"]
    main, jax_cmp, torch_cmp = recs
    for r in recs:
        assert r["mode"] == "backbone" and r["size"] == [64, 96] and r["batch"] == 1 and r["dtype"] == "float32"
        assert r["device_kind"] and r["jax"] and r["cpu_cores"] >= 1
        assert len(r["step_times_s"]) == 2 and r["step_s"]["p10"] <= r["step_s"]["median"] <= r["step_s"]["p90"]
        assert r["flops_per_image"] > 1e8
        assert r["backbone_args"]["attention_query_chunk"] == 16
    # Stage 3 has 4 x 6 = 24 queries > 16: chunked, so the FLOPs come from the unchunked twin.
    assert "without attention query chunks" in main["flops_source"]
    assert main["compile_s"] > 0 and main["peak_memory_bytes"] > 0 and main["peak_memory_source"]
    assert jax_cmp["max_rel_diff"] < 1e-4 and torch_cmp["torch_threads"] >= 1
    assert jax_cmp["torch_over_jax"] == pytest.approx(
        torch_cmp["step_s"]["median"] / jax_cmp["step_s"]["median"])
    assert "torch / jax median step time" in capsys.readouterr().out


def test_train_compare_and_unknown_keys_are_refused(tmp_path, capsys):
    script = _script()
    assert script.main(["--config", TI, "--mode", "train", "--compare-torch", "--out", str(tmp_path / "r")]) == 2
    assert "no training step" in capsys.readouterr().err
    assert script.main(["--config", TI, "--config.model.fpn_channelz=1"]) == 2
    assert "did you mean 'model.fpn_channels'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_mode_on_the_synthetic_config(tmp_path):
    out = str(tmp_path / "results.jsonl")
    synth = os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py")
    rc = _script().main(["--config", synth, "--mode", "train", "--batch", "2", "--size", "64x96", "--steps", "2",
                         "--out", out, "--config.model.backbone_args.depths=(1, 1, 1, 1)"])
    assert rc == 0
    (rec,) = _records(out)
    assert rec["mode"] == "train" and rec["batch"] == 2 and rec["images_per_s"] > 0


def _image(tmp_path):
    import cv2
    import numpy as np

    path = str(tmp_path / "img.jpg")
    cv2.imwrite(path, np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    return path


@pytest.mark.slow  # ~27 s each (compiles predict and the stages)
@pytest.mark.parametrize("config", ["synthetic_retinanet_lit_ti.py", "synthetic_mask_rcnn_lit_ti.py"])
def test_infer_image_end_to_end_with_stage_breakdown(tmp_path, capsys, config):
    out = str(tmp_path / "results.jsonl")
    rc = _script().main(["--config", os.path.join(ROOT, "configs", config), "--mode", "infer", "--image",
                         _image(tmp_path), "--steps", "1", "--warmup", "0", "--out", out,
                         "--config.data.img_scale=(96, 64)", "--config.model.backbone_args.depths=(1, 1, 1, 1)"])
    assert rc == 0
    (rec,) = _records(out)
    assert rec["size"] == [64, 96] and rec["ori_shape"] == [40, 60] and rec["images_per_s"] > 0
    assert rec["compiled_functions_first_call"] >= 1 and rec["compilations_during_rounds"] == 0
    stages = rec["stages"]
    expected = {"preprocessing", "backbone", "FPN", "NMS", "results to host"}
    expected |= {"RPN + proposals", "RoI box head", "RoI mask head", "mask paste"} if "mask" in config else {
        "dense head"}
    assert set(stages) == expected
    assert sum(s["share"] for s in stages.values()) == pytest.approx(1.0)
    assert "compiled functions" in capsys.readouterr().out


def test_bad_image_and_negative_chunk_are_one_error_line(tmp_path, capsys):
    """A missing or undecodable --image and a negative chunk switch stop with one `error:` line naming the file or
    value, before anything compiles and without a record."""
    script, out = _script(), str(tmp_path / "r.jsonl")
    synth = os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py")
    missing = str(tmp_path / "missing.jpg")
    assert script.main(["--config", synth, "--mode", "infer", "--image", missing, "--out", out]) == 2
    assert f"error: --image {missing} does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert script.main(["--config", synth, "--mode", "infer", "--image", str(broken), "--out", out]) == 2
    assert f"error: --image: image {broken} (12 bytes) does not decode" in capsys.readouterr().err
    assert script.main(["--config", synth, "--config.model.backbone_args.mlp_token_chunk=-4", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "error: a chunk size (attention_query_chunk / mlp_token_chunk) must be >= 0" in err and "-4" in err
    assert not os.path.exists(out)
