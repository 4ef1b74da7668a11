"""The Mask R-CNN train-step breakdown (lit_jax.benchmarking.staged_train, benchmark.py --mode train --breakdown):
its separately compiled parts, composed, give the loss, terms, gradients and BatchNorm statistics of
``jax.value_and_grad(detector.loss)`` (what the trainer differentiates)."""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lit_jax.benchmarking import compare_composed, format_train_breakdown, staged_train, train_breakdown
from lit_jax.models.mask_rcnn import MaskRCNNConfig, build_mask_rcnn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ["backbone fwd", "FPN fwd", "RPN head fwd", "RPN targets (anchor assign + sample)",
         "proposals (top-k, decode, NMS)", "RoI assign + sample", "bbox RoIAlign 7x7 fwd", "box head fwd",
         "mask targets", "mask RoIAlign 14x14 fwd", "mask head fwd", "losses fwd+bwd", "mask head fwd+bwd",
         "mask RoIAlign 14x14 fwd+bwd", "box head fwd+bwd", "bbox RoIAlign 7x7 fwd+bwd", "RPN head fwd+bwd",
         "FPN fwd+bwd", "backbone fwd+bwd"]


class TinyBackbone(nn.Module):
    """Four strided convs (strides 4, 8, 16, 32) with BatchNorm (batch_stats) and dropout (the 'dropout' rng), so
    the breakdown's backbone part is checked on both; compiles in a second, unlike LIT."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        outs = []
        for i, (c, s) in enumerate([(8, 4), (8, 2), (16, 2), (16, 2)]):
            x = nn.Conv(c, (3, 3), strides=(s, s), name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
            x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
            outs.append(x)
        return outs


def _setup():
    cfg = MaskRCNNConfig(num_classes=3, rcnn_num_samples=32, rpn_train_nms_pre=64, rpn_train_max_per_img=32)
    det = build_mask_rcnn(TinyBackbone(), num_classes=3, cfg=cfg, fpn_channels=8, fc_out_channels=16,
                          mask_conv_channels=8)
    hw, b = (64, 96), 2
    variables = det.init(jax.random.PRNGKey(0), hw)
    rng = np.random.default_rng(0)
    boxes = np.array([[[8, 6, 60, 50], [40, 20, 90, 60], [0, 0, 0, 0]], [[4, 30, 30, 62], [50, 2, 95, 40],
                                                                          [0, 0, 0, 0]]], np.float32)
    batch = {"images": jnp.asarray(rng.standard_normal((b, *hw, 3)), jnp.float32),
             "gt_boxes": jnp.asarray(boxes), "gt_labels": jnp.asarray([[0, 2, -1], [1, 1, -1]], jnp.int32),
             "gt_valid": jnp.asarray([[True, True, False]] * b),
             "gt_masks": jnp.asarray((rng.random((b, 3, 56, 56)) < 0.6).astype(np.uint8)),
             "img_shape": jnp.asarray([hw] * b, jnp.int32), "pad_shape": jnp.asarray([hw] * b, jnp.int32)}
    return det, variables, batch


@pytest.mark.slow  # ~50-65 s on 2 cores (compiles every part forward and backward); the default suite stays near 20 min
def test_staged_parts_compose_to_the_trainers_loss_and_gradient():
    det, variables, batch = _setup()
    key = jax.random.PRNGKey(5)
    staged = staged_train(det, variables, batch, key)
    assert [p.name for p in staged.parts] == PARTS
    assert {p.kind for p in staged.parts} == {"fwd", "fwd+bwd", "no grad"}
    params, stats = variables["params"], variables["batch_stats"]
    total, terms, grads, new_stats = staged.loss_and_grad(params, stats)
    # What the trainer differentiates (lit_jax.train.trainer.build_train_step's loss_fn), jitted whole.
    whole = jax.jit(staged.whole()).lower(params, stats).compile()
    (ref, aux), ref_grads = whole(params, stats)
    assert float(ref) > 0 and abs(float(total) - float(ref)) <= 1e-5 * abs(float(ref))
    for k, v in terms.items():
        np.testing.assert_allclose(float(v), float(aux[k]), rtol=1e-5, atol=1e-7)
    assert float(aux["loss_mask"]) > 0 and float(aux["loss_bbox"]) > 0  # every branch carries gradient
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grads))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref_grads)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
        assert float(jnp.abs(r).max()) > 0 or "bias" in jax.tree_util.keystr(path)
    for a, b in zip(jax.tree_util.tree_leaves(new_stats), jax.tree_util.tree_leaves(aux["batch_stats"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    # The timing table: every part, the whole, shares of the whole; the self-check the script prints.
    check = compare_composed(staged, whole, params, stats)
    assert check["loss_rel_diff"] <= 1e-5 and check["grad_max_diff_rel"] <= 1e-5
    res = train_breakdown(staged, whole, 1e9, params, stats, rounds=1, warmup=0)
    assert [r["name"] for r in res["parts"]] == PARTS and res["whole"]["median_s"] > 0
    assert all(r["median_s"] > 0 and r["share"] == pytest.approx(r["median_s"] / res["whole"]["median_s"])
               for r in res["parts"])
    assert {r["name"] for r in res["parts"] if r["gflop"] > 0} >= {"backbone fwd+bwd", "mask head fwd+bwd"}
    text = "\n".join(format_train_breakdown(res))
    assert all(f"| {name} |" in text for name in PARTS) and "loss + grad (whole, one jit)" in text


def test_breakdown_is_for_mask_rcnn(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("lit_benchmark", os.path.join(ROOT, "scripts", "benchmark.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    retina = os.path.join(ROOT, "configs", "synthetic_retinanet_lit_ti.py")
    out = str(tmp_path / "r.jsonl")
    assert script.main(["--config", retina, "--mode", "train", "--breakdown", "--out", out]) == 2
    assert "splits the Mask R-CNN train step" in capsys.readouterr().err
    assert script.main(["--config", retina, "--mode", "infer", "--breakdown", "--out", out]) == 2
    assert "--breakdown is for --mode train" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.slow  # ~2-3 minutes on 2 shared cores: compiles the LIT parts twice, the whole loss and the step
def test_benchmark_train_breakdown_on_the_synthetic_config(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("lit_benchmark", os.path.join(ROOT, "scripts", "benchmark.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = str(tmp_path / "r.jsonl")
    rc = script.main(["--config", os.path.join(ROOT, "configs", "synthetic_mask_rcnn_lit_ti.py"), "--mode", "train",
                      "--breakdown", "--baseline", "model.train_test.roi_align_backward=rows", "--batch", "2",
                      "--size", "64x96", "--steps", "1", "--warmup", "0", "--out", out,
                      "--config.model.backbone_args.depths=(1, 1, 1, 1)"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in PARTS) and "train step (whole: + AdamW)" in printed
    (rec,) = [json.loads(line) for line in open(out)]
    assert rec["composed_check"]["loss_rel_diff"] <= 1e-5
    assert rec["composed_check"]["grad_max_diff_rel"] <= 1e-3  # LIT's DCN and the mask head: see docs/benchmarks.md
    bd = rec["breakdown"]
    assert [r["name"] for r in bd["parts"]] == PARTS and [r["name"] for r in bd["baseline"]["parts"]] == PARTS
    assert bd["train_step"]["median_s"] > 0
    assert rec["baseline_overrides"] == ["model.train_test.roi_align_backward=rows"]
