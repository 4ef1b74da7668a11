"""ImageNet checkpoint import: every key accounted for, tables resized like the original loader, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from lit_jax.convert import ConversionError, convert_backbone, load_pth, load_variables
from lit_jax.convert.lit import resize_bias_table
from lit_jax.models import build_backbone
from third_party.lit_torch import build_model, save_random_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RTOL = 1e-4


def _outputs_close(module, variables, ref, hw=(96, 160)):
    images = np.random.default_rng(0).standard_normal((1, hw[0], hw[1], 3)).astype(np.float32)
    outs = jax.jit(lambda v, x: module.apply(v, x))(variables, jnp.asarray(images))
    with torch.no_grad():
        want = ref(torch.from_numpy(images).permute(0, 3, 1, 2))
    for i, (a, b) in enumerate(zip(outs, want)):
        b = b.permute(0, 2, 3, 1).numpy()
        err, scale = np.abs(np.asarray(a) - b).max(), np.abs(b).max()
        assert err <= RTOL * scale, f"stage {i}: {err} > {RTOL} x {scale}"


def test_lit_ti_imagenet_nested_under_model(tmp_path, caplog):
    """The release layout {'model': state_dict}: the original's mmcv loader loads nothing; we load it all."""
    path = tmp_path / "lit_ti.pth"
    cls = save_random_checkpoint("lit_ti", str(path), seed=7, variant="cls", nest="model")
    sd = torch.load(path, weights_only=True)["model"]
    module = build_backbone("lit_ti")
    with caplog.at_level("INFO"):
        variables = load_pth(path, module)
    assert "silently loads nothing" in caplog.text
    assert "dropped 5 keys" in caplog.text
    # The detection reference, given the same weights as the original's strict=False load would.
    ref = build_model("lit_ti", "det").eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert missing == [] and sorted(unexpected) == ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]
    _outputs_close(module, variables, ref)
    del cls


def test_lit_s_imagenet_tables_resized_like_the_original_loader(tmp_path):
    path = tmp_path / "lit_s.pth"
    save_random_checkpoint("lit_s", str(path), seed=8, variant="cls", nest="model")
    sd = torch.load(path, weights_only=True)["model"]
    module = build_backbone("lit_s")
    variables, report = convert_backbone(
        {k: v.numpy() for k, v in sd.items()}, module, source=str(path)
    )
    assert sorted(report.dropped) == sorted(
        ["head.weight", "head.bias", "norm.weight", "norm.bias"]
        + [f"layers.2.blocks.{i}.attn.relative_position_index" for i in range(6)]
        + [f"layers.3.blocks.{i}.attn.relative_position_index" for i in range(2)]
    )
    assert sorted(report.initialised) == sorted(f"params/norm{i}/{p}" for i in (1, 2, 3) for p in ("scale", "bias"))
    assert len(report.resized) == 8
    # What the original's loader does: view (heads, S, S), bicubic to (S', S'), back to rows.
    ref = build_model("lit_s", "det").eval()
    converted = {}
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table"):
            side, heads = int(round(v.shape[0] ** 0.5)), v.shape[1]
            out = {27: 99, 13: 49}[side]
            grid = v.permute(1, 0).reshape(1, heads, side, side)
            v = F.interpolate(grid, size=(out, out), mode="bicubic", align_corners=False)
            v = v.reshape(heads, out * out).permute(1, 0)
        converted[k] = v
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert sorted(missing) == sorted(f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias"))
    table = variables["params"]["layers_2"]["blocks_0"]["attn"]["relative_position_bias_table"]
    want = ref.state_dict()["layers.2.blocks.0.attn.relative_position_bias_table"].numpy()
    assert np.abs(table - want).max() <= 1e-5 * np.abs(want).max()
    _outputs_close(module, variables, ref)


def test_resize_bias_table_identity_and_shape():
    table = np.random.default_rng(0).standard_normal((27 * 27, 3)).astype(np.float32)
    np.testing.assert_allclose(resize_bias_table(table, 27), table, atol=1e-6)
    assert resize_bias_table(table, 99).shape == (99 * 99, 3)


def test_detection_checkpoint_backbone_prefix(tmp_path):
    """An mmdet-style file: {'meta', 'state_dict'} with 'backbone.' keys loads without drops."""
    path = tmp_path / "det.pth"
    ref = save_random_checkpoint("lit_ti", str(path), seed=9, variant="det", nest="state_dict", prefix="backbone.")
    variables = load_pth(path, "lit_ti")
    _outputs_close(build_backbone("lit_ti"), variables, ref)


def _state_dict(name="lit_ti", seed=0):
    model = build_model(name, "det")
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_wrong_shape_is_an_error_naming_the_key():
    sd = _state_dict()
    sd["block3.2.mlp.fc1.weight"] = np.zeros((7, 320), np.float32)
    with pytest.raises(ConversionError, match=r"block3\.2\.mlp\.fc1\.weight: checkpoint \(7, 320\)"):
        convert_backbone(sd, build_backbone("lit_ti"), source="x.pth")


def test_unexpected_and_missing_keys_are_listed_together():
    sd = _state_dict()
    del sd["pos_embed2"]
    del sd["block4.2.attn.proj.bias"]
    sd["block9.0.mlp.fc1.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_backbone(sd, build_backbone("lit_ti"), source="x.pth")
    msg = str(err.value)
    assert "x.pth" in msg
    assert "params/pos_embed2 (1, 784, 128)" in msg
    assert "params/block4_2/attn/proj/bias (512,)" in msg
    assert "block9.0.mlp.fc1.weight (4, 4)" in msg


def test_lit_s_checkpoint_given_to_lit_ti_fails_with_a_list(tmp_path):
    path = tmp_path / "s.pth"
    save_random_checkpoint("lit_s", str(path), seed=1, variant="det")
    with pytest.raises(ConversionError, match="unexpected key"):
        load_pth(path, "lit_ti")


def test_convert_weights_cli_writes_a_loadable_checkpoint(tmp_path):
    src = tmp_path / "lit_ti.pth"
    save_random_checkpoint("lit_ti", str(src), seed=2, variant="cls", nest="model")
    dst = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"), "--model", "lit_ti",
         "--src", str(src), "--dst", str(dst)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "dropped 5 keys" in run.stdout
    restored = load_variables(str(dst))
    direct = load_pth(src, "lit_ti")
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, direct)
    info = json.loads((dst / "conversion.json").read_text())
    assert info["model"] == "lit_ti" and len(info["dropped"]) == 5

    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"), "--model", "lit_s",
         "--src", str(src), "--dst", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1 and "does not fit the model" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind,modules,count", [
    ("retinanet", {"backbone", "neck", "bbox_head"}, 29_621_708),
    ("mask_rcnn", {"backbone", "neck", "rpn_head", "roi_head"}, 39_539_144),
])
def test_convert_weights_cli_for_a_released_style_detector(tmp_path, kind, modules, count):
    """A random mmdet-layout detector checkpoint converts through the CLI with every key used."""
    from lit_jax.convert.mmdet import load_mmdet_pth
    from lit_jax.models import build_detector
    from third_party.lit_torch.save_detector import save_random_detector

    src = tmp_path / f"{kind}.pth"
    save_random_detector(f"{kind}_lit_ti", str(src), seed=4)
    dst = tmp_path / f"{kind}_out"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"), "--model", f"{kind}_lit_ti",
         "--src", str(src), "--dst", str(dst)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    direct = load_mmdet_pth(src, build_detector({"type": kind, "backbone": "lit_ti"}))
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_variables(str(dst)), direct)
    assert set(direct["params"]) == modules
    from lit_jax.evaluation.coco_classes import COCO_CATEGORY_IDS, COCO_CLASSES

    info = json.load(open(dst / "conversion.json"))  # the class names travel with the weights
    assert info["class_names"] == list(COCO_CLASSES) and info["category_ids"] == list(COCO_CATEGORY_IDS)
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(direct["params"])) == count


def test_imagenet_parameter_count_is_accounted_for(tmp_path):
    """Loaded + dropped (classifier) parameters add up to the published ImageNet sizes (19.9M / 28.0M)."""
    for name, want in (("lit_ti", 19_886_272), ("lit_s", 27_973_720)):
        path = tmp_path / f"{name}.pth"
        save_random_checkpoint(name, str(path), seed=0, variant="cls", nest="model")
        sd = torch.load(path, weights_only=True)["model"]
        _, report = convert_backbone({k: v.numpy() for k, v in sd.items()}, build_backbone(name), source=str(path))
        used = report.loaded + [k for k in report.dropped if not k.endswith("relative_position_index")]
        total = sum(sd[k].numel() for k in used if not k.endswith(("running_mean", "running_var")))
        assert total == want


def _convert_weights_main():
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_weights_cli", os.path.join(ROOT, "scripts", "convert_weights.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_convert_weights_checks_dst_before_reading_the_pth(tmp_path, capsys):
    main = _convert_weights_main()
    dst = tmp_path / "out"
    (dst / "variables").mkdir(parents=True)
    missing_src = str(tmp_path / "never_read.pth")  # an error about --dst, not the .pth, shows it is checked first
    assert main(["--model", "lit_ti", "--src", missing_src, "--dst", str(dst)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --dst") and str(dst) in err and "--overwrite" in err and "\n" not in err
    (tmp_path / "a_file").write_text("x")
    assert main(["--model", "lit_ti", "--src", missing_src, "--dst", str(tmp_path / "a_file")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert main(["--model", "lit_ti", "--src", str(tmp_path), "--dst", str(tmp_path / "new")]) == 1  # a folder
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_convert_weights_overwrite_replaces_an_existing_conversion(tmp_path, capsys):
    main = _convert_weights_main()
    src = tmp_path / "lit_ti.pth"
    save_random_checkpoint("lit_ti", str(src), seed=2, variant="cls", nest="model")
    dst = tmp_path / "out"
    (dst / "variables").mkdir(parents=True)
    (dst / "conversion.json").write_text("{}")
    assert main(["--model", "lit_ti", "--src", str(src), "--dst", str(dst), "--overwrite"]) == 0
    assert json.loads((dst / "conversion.json").read_text())["model"] == "lit_ti"
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_variables(str(dst)), load_pth(src, "lit_ti"))
