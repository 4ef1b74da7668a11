"""The Mask R-CNN train step's loss + gradient split into separately compiled parts, timed against the whole.

:func:`staged_train` builds the parts (forwards, ``vjp`` forward+backward parts, the no-gradient target and
sampling steps, the losses); :func:`compare_composed` checks that the parts composed give the whole's loss and
gradients; :func:`train_breakdown` times every part with the whole loss + gradient (and the whole train step) in
alternating rounds; :func:`format_train_breakdown` prints the result as a Markdown table.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.benchmarking.costs import flops_of
from lit_jax.benchmarking.timing import time_rounds


class TrainPart(NamedTuple):
    """One separately compiled part of the Mask R-CNN loss + gradient.

    ``fn`` is a compiled executable, called as ``fn(*args)`` (the args are the part's real inputs, produced by the
    parts before it); ``flops`` from its ``cost_analysis()`` (XLA counts a loop body once: RoIAlign's sample loop
    and the NMS loops are undercounted; the backbone's chunk loops are not, when :func:`staged_train` is given an
    unchunked twin); ``kind`` is ``'fwd'``, ``'fwd+bwd'`` (a ``vjp``: forward recomputed, then
    the backward) or ``'no grad'``; ``in_total``: the part belongs to the partition of ``jit(value_and_grad(loss))``
    (the ``'fwd+bwd'`` and ``'no grad'`` parts; a ``'fwd'`` part is shown for its forward share only).
    """
    name: str
    fn: Callable
    args: tuple
    flops: float
    kind: str
    in_total: bool


class StagedTrain:
    """The Mask R-CNN training loss split into separately jitted parts (:func:`staged_train`).

    ``parts``: the :class:`TrainPart` list, in the order the loss runs them; ``loss_and_grad(params,
    batch_stats)`` composes the same compiled pieces (forwards, then the ``vjp`` of each part in reverse order) into
    ``(total loss, {term: value}, grads, new batch_stats)`` -- what ``jax.value_and_grad(detector.loss)`` gives,
    up to float summation order (tested in ``tests/scripts/test_benchmark_train_breakdown.py``).
    """

    def __init__(self, det, variables, batch, rng, flops_det=None):
        self.det = det
        self.flops_det = flops_det
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.rng = rng
        self._build(variables)

    # Each function below is one part; ``_compile`` lowers it on its real arguments once. ``flops_fn``: the same
    # part built on ``flops_det`` (no chunk loops), lowered only to count its FLOPs.
    def _compile(self, fn, *args, flops_fn=None):
        compiled = jax.jit(fn).lower(*args).compile()
        return compiled, flops_of(jax.jit(flops_fn).lower(*args) if flops_fn is not None else compiled)

    def _build(self, variables):
        from lit_jax.models.mask_rcnn import MaskRCNNModule

        det, batch = self.det, self.batch
        canvas = tuple(batch["images"].shape[1:3])
        self.canvas = canvas
        k_drop, k_rpn, k_roi = jax.random.split(self.rng, 3)
        self.keys = (k_drop, k_rpn, k_roi)
        mod = det.module

        def backbone_of(module):
            def backbone(p, bs, images, key):
                out, upd = module.apply({"params": {"backbone": p}, "batch_stats": bs}, images,
                                        method=lambda m, x: m.backbone(x, train=True), mutable=["batch_stats"],
                                        rngs={"dropout": key})
                return out, upd["batch_stats"]
            return backbone

        backbone = backbone_of(mod)

        def neck(p, c):
            return mod.apply({"params": {"neck": p}}, c, method=lambda m, x: m.neck(x))

        def rpn_head(p, feats):
            return mod.apply({"params": {"rpn_head": p}}, feats, method=lambda m, x: m.rpn_head(x))

        def box_head(p, roi_feats):
            return mod.apply({"params": {"roi_head": {"bbox_head": p}}}, roi_feats,
                             method=MaskRCNNModule.bbox_forward)

        def mask_head(p, roi_feats):
            return mod.apply({"params": {"roi_head": {"mask_head": p}}}, roi_feats,
                             method=MaskRCNNModule.mask_forward)

        def roi_align(out):
            def fn(feats4, rois):
                return det._roi_features(feats4, rois, out, True)
            return fn

        def losses(rpn_logits, rpn_deltas, cls_score, bbox_pred, mask_logits, t, s, targets):
            rc, rb = det.rpn_losses(rpn_logits, rpn_deltas, t)
            lc, lb, lm = det.rcnn_losses(cls_score, bbox_pred, mask_logits, s, targets)
            terms = {"loss_rpn_cls": rc, "loss_rpn_bbox": rb, "loss_cls": lc, "loss_bbox": lb, "loss_mask": lm}
            return sum(terms.values()), terms

        def vjp_of(f, n_diff, has_aux=False):
            """fwd+bwd: ``(*diff_args, *rest, ct) -> grads of the first n_diff args`` (forward recomputed)."""
            def fn(*args):
                diff, rest, ct = args[:n_diff], args[n_diff:-1], args[-1]
                res = jax.vjp(lambda *d: f(*d, *rest), *diff, has_aux=has_aux)
                return res[1](ct)
            return fn

        self.fns = dict(backbone=backbone, neck=neck, rpn_head=rpn_head, box_head=box_head, mask_head=mask_head,
                        roi7=roi_align(7), roi14=roi_align(14), losses=losses)
        self.vjp_fns = dict(backbone=vjp_of(backbone, 1, has_aux=True), neck=vjp_of(neck, 2),
                            rpn_head=vjp_of(rpn_head, 2), box_head=vjp_of(box_head, 2),
                            mask_head=vjp_of(mask_head, 2), roi7=vjp_of(roi_align(7), 1),
                            roi14=vjp_of(roi_align(14), 1))
        self.nograd = dict(
            rpn_targets=lambda key, b: det.rpn_train_targets(key, canvas, b),
            proposals=lambda lg, dl, img_shape: det.train_proposals(lg, dl, canvas, img_shape),
            sampling=lambda key, props, valid, b: det.sample_train_rois(key, props, valid, b),
            mask_targets=lambda b, s: det.mask_train_targets(b, s),
            bbox_rois=det.bbox_train_rois, mask_rois=det.mask_train_rois,
        )
        self.losses_vg = jax.value_and_grad(losses, argnums=(0, 1, 2, 3, 4), has_aux=True)
        # The backbone is the only part with chunk loops (LIT's query and token chunks).
        self.flops_fns = {}
        if self.flops_det is not None:
            twin = backbone_of(self.flops_det.module)
            self.flops_fns = {"bb": twin, "bb_vjp": vjp_of(twin, 1, has_aux=True)}
        self.compiled = {}
        self.parts = []
        self._run(variables["params"], variables.get("batch_stats", {}), record=True)

    def _call(self, key, fn, *args, record=False, name=None, kind="fwd", in_total=False):
        if key not in self.compiled:
            self.compiled[key] = self._compile(fn, *args, flops_fn=self.flops_fns.get(key))
        compiled, flops = self.compiled[key]
        if record and name is not None:
            self.parts.append(TrainPart(name, compiled, args, flops, kind, in_total))
        return compiled(*args)

    def _run(self, params, batch_stats, record=False):
        b = self.batch
        k_drop, k_rpn, k_roi = self.keys
        c = self._call
        f, v, ng = self.fns, self.vjp_fns, self.nograd
        p_box, p_mask = params["roi_head"]["bbox_head"], params["roi_head"]["mask_head"]
        # Forwards.
        stages, new_bs = c("bb", f["backbone"], params["backbone"], batch_stats, b["images"], k_drop, record=record,
                           name="backbone fwd")
        feats = c("neck", f["neck"], params["neck"], stages, record=record, name="FPN fwd")
        rpn_logits, rpn_deltas = c("rpn", f["rpn_head"], params["rpn_head"], feats, record=record,
                                   name="RPN head fwd")
        gt = {k: b[k] for k in ("gt_boxes", "gt_labels", "gt_valid", "gt_masks", "img_shape", "pad_shape")}
        t = c("rpn_t", ng["rpn_targets"], k_rpn, gt, record=record, name="RPN targets (anchor assign + sample)",
              kind="no grad", in_total=True)
        props, prop_valid = c("props", ng["proposals"], rpn_logits, rpn_deltas, b["img_shape"], record=record,
                              name="proposals (top-k, decode, NMS)", kind="no grad", in_total=True)
        s = c("sample", ng["sampling"], k_roi, props, prop_valid, gt, record=record,
              name="RoI assign + sample", kind="no grad", in_total=True)
        rois = c("rois", ng["bbox_rois"], s)
        mrois = c("mrois", ng["mask_rois"], s)
        feats4 = tuple(feats[:4])
        roi7 = c("roi7", f["roi7"], feats4, rois, record=record, name="bbox RoIAlign 7x7 fwd")
        cls_score, bbox_pred = c("box", f["box_head"], p_box, roi7, record=record, name="box head fwd")
        targets = c("mtgt", ng["mask_targets"], gt, s, record=record, name="mask targets", kind="no grad",
                    in_total=True)
        roi14 = c("roi14", f["roi14"], feats4, mrois, record=record, name="mask RoIAlign 14x14 fwd")
        mask_logits = c("mask", f["mask_head"], p_mask, roi14, record=record, name="mask head fwd")
        # Losses and the gradient of the total w.r.t. the five head outputs.
        (total, terms), (g_lg, g_dl, g_cls, g_box, g_mask) = c(
            "losses", self.losses_vg, rpn_logits, rpn_deltas, cls_score, bbox_pred, mask_logits, t, s, targets,
            record=record, name="losses fwd+bwd", kind="fwd+bwd", in_total=True)
        # Backwards (each a vjp: the part's forward recomputed, then its transpose), in reverse order.
        gp_mask, g_roi14 = c("mask_vjp", v["mask_head"], p_mask, roi14, g_mask, record=record,
                             name="mask head fwd+bwd", kind="fwd+bwd", in_total=True)
        (g_f14,) = c("roi14_vjp", v["roi14"], feats4, mrois, g_roi14, record=record,
                     name="mask RoIAlign 14x14 fwd+bwd", kind="fwd+bwd", in_total=True)
        gp_box, g_roi7 = c("box_vjp", v["box_head"], p_box, roi7, (g_cls, g_box), record=record,
                           name="box head fwd+bwd", kind="fwd+bwd", in_total=True)
        (g_f7,) = c("roi7_vjp", v["roi7"], feats4, rois, g_roi7, record=record, name="bbox RoIAlign 7x7 fwd+bwd",
                    kind="fwd+bwd", in_total=True)
        gp_rpn, g_feats = c("rpn_vjp", v["rpn_head"], params["rpn_head"], feats, (g_lg, g_dl), record=record,
                            name="RPN head fwd+bwd", kind="fwd+bwd", in_total=True)
        g_feats = type(g_feats)(g + (g_f7[i] + g_f14[i] if i < 4 else 0.0) for i, g in enumerate(g_feats))
        gp_neck, g_stages = c("neck_vjp", v["neck"], params["neck"], stages, g_feats, record=record,
                              name="FPN fwd+bwd", kind="fwd+bwd", in_total=True)
        (gp_bb,) = c("bb_vjp", v["backbone"], params["backbone"], batch_stats, b["images"], k_drop, g_stages,
                     record=record, name="backbone fwd+bwd", kind="fwd+bwd", in_total=True)
        grads = {"backbone": gp_bb, "neck": gp_neck, "rpn_head": gp_rpn,
                 "roi_head": {"bbox_head": gp_box, "mask_head": gp_mask}}
        return total, terms, grads, new_bs

    def loss_and_grad(self, params, batch_stats):
        """``(total, terms, grads, new batch_stats)`` composed from the compiled parts (same batch and rng)."""
        return self._run(params, batch_stats)

    def whole(self, det=None):
        """The uncut ``value_and_grad(detector.loss)`` on the same batch and rng, as a function of
        ``(params, batch_stats)`` (jit it to compare or time it); ``det``: another build of the detector (default:
        this one's)."""
        det, batch, rng = det or self.det, self.batch, self.rng

        def loss_and_grad(params, batch_stats):
            return jax.value_and_grad(lambda p: det.loss({"params": p, "batch_stats": batch_stats}, batch, rng),
                                      has_aux=True)(params)

        return loss_and_grad


def staged_train(det, variables, batch, rng, flops_det=None) -> StagedTrain:
    """The Mask R-CNN training loss (:meth:`lit_jax.models.mask_rcnn.MaskRCNN.loss`) on ``batch`` split into
    separately compiled parts: backbone, FPN, RPN head (forward, and forward+backward as a ``vjp``), RPN targets,
    proposals, RoI assign + sample, bbox RoIAlign 7x7 (forward, forward+backward), box head, mask targets, mask
    RoIAlign 14x14, mask head, losses. Compiles every part once and runs it once to produce the next part's inputs.
    ``flops_det``: the same detector built without chunk loops (``benchmarking.costs.unchunked``), whose backbone
    parts are lowered to count FLOPs that XLA would count once per loop in ``det``'s.
    """
    if not hasattr(det, "rpn_train_targets"):
        raise ValueError(f"the train-step breakdown is for Mask R-CNN; got {type(det).__name__}")
    return StagedTrain(det, variables, batch, rng, flops_det)


def part_runner(part: TrainPart) -> Callable[[], object]:
    return lambda: jax.block_until_ready(part.fn(*part.args))


def compare_composed(staged: StagedTrain, whole_compiled, params, batch_stats) -> dict:
    """The composed parts against the uncut loss + gradient: relative loss difference, the largest gradient
    difference relative to the largest gradient entry of the whole tree, and the largest term difference."""
    total, terms, grads, _ = staged.loss_and_grad(params, batch_stats)
    (ref, aux), ref_grads = whole_compiled(params, batch_stats)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(ref_grads))
    diffs = {jax.tree_util.keystr(path): float(jnp.max(jnp.abs(a - b)))
             for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads))}
    worst = max(diffs, key=diffs.get)
    return {"loss": float(ref), "loss_rel_diff": abs(float(total) - float(ref)) / max(abs(float(ref)), 1e-30),
            "grad_max_abs": scale, "grad_max_diff_rel": diffs[worst] / max(scale, 1e-30), "grad_worst_leaf": worst,
            "term_max_abs_diff": max(abs(float(terms[k]) - float(aux[k])) for k in terms)}


def train_breakdown(staged: StagedTrain, whole_compiled, whole_flops: float, params, batch_stats, rounds: int,
                    warmup: int = 1, train_step: Optional[tuple] = None, baseline: Optional[tuple] = None) -> dict:
    """Times every part of ``staged``, the whole loss + gradient and (``train_step = (runner, flops)``) the whole
    train step in the same alternating rounds; with ``baseline = (staged, whole_compiled, whole_flops)`` (the same
    parts of another build of the model, e.g. the earlier RoIAlign backward) its parts and whole loss + gradient
    too, in the same rounds. Returns ``{'parts': [{name, kind, in_total, median_s, times_s, gflop, gflops_per_s,
    share}], 'whole': {...}, 'train_step': {...}, 'sum_in_total_s': ..., 'baseline': {same keys}}``; ``share`` is
    the part's median over its whole loss + gradient's median."""
    runners = {p.name: part_runner(p) for p in staged.parts}
    runners["loss + grad (whole)"] = lambda: jax.block_until_ready(whole_compiled(params, batch_stats))
    if baseline is not None:
        b_staged, b_whole, b_flops = baseline
        runners.update({"baseline: " + p.name: part_runner(p) for p in b_staged.parts})
        runners["baseline: loss + grad (whole)"] = lambda: jax.block_until_ready(b_whole(params, batch_stats))
    if train_step is not None:
        runners["train step (whole)"] = train_step[0]
    times = time_rounds(runners, rounds, warmup)

    def row(name, flops, prefix="", **extra):
        ts = times[prefix + name]
        med = float(np.median(ts))
        return dict(name=name, median_s=med, times_s=ts, gflop=flops / 1e9,
                    gflops_per_s=flops / 1e9 / med if med > 0 else 0.0, **extra)

    def table(st, w_flops, prefix=""):
        whole = row("loss + grad (whole)", w_flops, prefix)
        parts = [row(p.name, p.flops, prefix, kind=p.kind, in_total=p.in_total) for p in st.parts]
        for r in parts:
            r["share"] = r["median_s"] / whole["median_s"]
        return {"parts": parts, "whole": whole, "sum_in_total_s": sum(r["median_s"] for r in parts if r["in_total"])}

    out = table(staged, whole_flops)
    if train_step is not None:
        out["train_step"] = row("train step (whole)", train_step[1])
    if baseline is not None:
        out["baseline"] = table(b_staged, b_flops, "baseline: ")
    return out


def format_train_breakdown(res: dict) -> list[str]:
    """The breakdown as text lines (a Markdown table; with a baseline, its medians and the ratio beside)."""
    base = res.get("baseline")
    bparts = {r["name"]: r for r in base["parts"]} if base else {}
    head = "| part | kind | median | share of loss+grad | GFLOP | GFLOP/s |"
    lines = [head + (" baseline median | baseline / this |" if base else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if base else "")]

    def extra(name, med):
        if not base:
            return ""
        b = bparts[name]["median_s"] if name in bparts else base["whole"]["median_s"]
        return f" {b * 1e3:,.1f} ms | {b / med:.2f}x |"

    for r in res["parts"]:
        mark = "" if r["in_total"] else " (not in sum)"
        lines.append(f"| {r['name']} | {r['kind']}{mark} | {r['median_s'] * 1e3:,.1f} ms | {100 * r['share']:.1f}% "
                     f"| {r['gflop']:,.2f} | {r['gflops_per_s']:,.1f} |" + extra(r["name"], r["median_s"]))
    w = res["whole"]
    s = res["sum_in_total_s"]
    lines.append(f"| sum of the parts in the sum | | {s * 1e3:,.1f} ms | {100 * s / w['median_s']:.1f}% | | |"
                 + (f" {base['sum_in_total_s'] * 1e3:,.1f} ms | {base['sum_in_total_s'] / s:.2f}x |" if base else ""))
    lines.append(f"| **loss + grad (whole, one jit)** | | {w['median_s'] * 1e3:,.1f} ms | 100% | {w['gflop']:,.2f} "
                 f"| {w['gflops_per_s']:,.1f} |" + extra("loss + grad (whole)", w["median_s"]))
    if "train_step" in res:
        t = res["train_step"]
        lines.append(f"| **train step (whole: + AdamW)** | | {t['median_s'] * 1e3:,.1f} ms | "
                     f"{100 * t['median_s'] / w['median_s']:.1f}% | {t['gflop']:,.2f} | {t['gflops_per_s']:,.1f} |"
                     + (" | |" if base else ""))
    return lines
