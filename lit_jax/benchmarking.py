"""Timing helpers for ``scripts/benchmark.py``: the inference path split into separately jitted stages.

The stages compute exactly what ``detector.predict`` computes (same functions, same order), each jitted on its
own and ended by ``block_until_ready``, so that the time of each can be read off. The whole ``jit(predict)`` is
measured apart: stage times add XLA launch and host syncs between stages, and lose cross-stage fusion.

Nothing here imports tensorflow, ml_collections or pycocotools (the image path imports cv2 only).
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["preprocess_bytes", "CompileWatch", "StagedInference", "staged_inference", "TrainPart", "StagedTrain",
           "staged_train", "time_rounds", "part_runner", "compare_composed", "train_breakdown",
           "format_train_breakdown"]


def preprocess_bytes(data: bytes, img_scale: Sequence[int], size_divisor: int = 32, name: str = "?"):
    """The test pipeline (:func:`lit_jax.data.image.prepare_image`) on encoded image bytes, decoded as mmcv.

    Returns ``(images (1, Hp, Wp, 3) float32, img_shape (1, 2) int32, scale_factor (1, 4) float32, (h0, w0))``.
    """
    import cv2

    from lit_jax.data.image import decode_bgr, prepare_image

    prepared = prepare_image(cv2.cvtColor(decode_bgr(data, name), cv2.COLOR_BGR2RGB), tuple(img_scale),
                             size_divisor=size_divisor)
    return (prepared.image[None], prepared.img_shape[None], prepared.scale_factor[None],
            tuple(int(v) for v in prepared.ori_shape))


class CompileWatch:
    """Counts the jax compilations (XLA backend compiles) made while active, and the seconds spent tracing,
    lowering and compiling: ``with CompileWatch() as w: ...; w.count, w.seconds``. A cache hit counts nothing.
    The listener is registered on entry and removed on exit, so a watch can be entered again (counts add up)."""

    _COMPILE = "/jax/core/compile/backend_compile_duration"
    _EVENTS = (_COMPILE, "/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def _listen(self, event: str, duration: float, **_):
        if event in self._EVENTS:
            self.seconds += duration
            self.count += event == self._COMPILE

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _timed(fn: Callable, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


class StagedInference:
    """``run(variables, images, img_shape, scale_factor, ori_hw)`` -> (host results dict, {stage: seconds})."""

    def __init__(self, stages: list[tuple[str, Callable]], finish: Callable):
        self.stages = stages  # (name, fn(state dict) -> state dict); fns are jitted where they run on device
        self.finish = finish  # state -> host results

    def run(self, variables, images, img_shape, scale_factor, ori_hw):
        state = dict(variables=variables, images=images, img_shape=jnp.asarray(img_shape, jnp.float32),
                     scale_factor=jnp.asarray(scale_factor, jnp.float32), ori_hw=tuple(ori_hw))
        times = {}
        for name, fn in self.stages:
            t0 = time.perf_counter()
            state = fn(state)
            jax.block_until_ready({k: v for k, v in state.items() if k != "ori_hw"})
            times[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self.finish(state)
        times["results to host"] = time.perf_counter() - t0
        return out, times


def _apply_sub(det, fn):
    """Applies ``fn(module, *args)`` to the detector's Flax module (its submodules are bound inside)."""
    def run(variables, *args):
        return det.module.apply(variables, *args, method=fn)
    return run


def staged_inference(det) -> StagedInference:
    """The stages of ``det.predict`` for a :class:`~lit_jax.models.mask_rcnn.MaskRCNN` or a RetinaNet."""
    backbone = jax.jit(_apply_sub(det, lambda m, x: m.backbone(x, train=False)))
    neck = jax.jit(_apply_sub(det, lambda m, f: m.neck(f)))

    def s_backbone(s):
        return dict(s, feats=backbone(s["variables"], s["images"]))

    def s_neck(s):
        return dict(s, feats=neck(s["variables"], s["feats"]))

    if hasattr(det, "detect"):  # Mask R-CNN
        return _mask_rcnn_stages(det, s_backbone, s_neck)
    return _retinanet_stages(det, s_backbone, s_neck)


def _retinanet_stages(det, s_backbone, s_neck) -> StagedInference:
    head = jax.jit(_apply_sub(det, lambda m, f: m.bbox_head(f)))

    @jax.jit
    def post(cls_out, reg_out, img_shape, scale_factor, canvas_like):
        canvas = canvas_like.shape[1:3]
        return jax.vmap(lambda c, r, i, sf: det.postprocess(c, r, canvas, i, sf))(cls_out, reg_out, img_shape,
                                                                                scale_factor)

    def s_head(s):
        return dict(s, head=head(s["variables"], s["feats"]))

    def s_post(s):
        cls_out, reg_out = s["head"]
        return dict(s, dets=post(cls_out, reg_out, s["img_shape"], s["scale_factor"], s["images"]))

    def finish(s):
        d = s["dets"]
        return {k: np.asarray(getattr(d, k)) for k in ("boxes", "scores", "labels", "valid")}

    return StagedInference([("backbone", s_backbone), ("FPN", s_neck), ("dense head", s_head),
                            ("NMS", s_post)], finish)


def _mask_rcnn_stages(det, s_backbone, s_neck) -> StagedInference:
    rpn_head = jax.jit(_apply_sub(det, lambda m, f: m.rpn_head(f)))

    @jax.jit
    def proposals(rpn_out, images, img_shape):
        return det.proposals(rpn_out, images.shape[1:3], img_shape)

    @jax.jit
    def box_head(variables, feats, props):
        b, p = props.shape[:2]
        bidx = jnp.repeat(jnp.arange(b, dtype=jnp.float32), p)[:, None]
        rois = jnp.concatenate([bidx, props.reshape(b * p, 4)], axis=1)
        cls_score, bbox_pred = det.bbox_forward(variables, feats, rois)
        return cls_score.reshape(b, p, -1), bbox_pred.reshape(b, p, -1)

    @jax.jit
    def nms(props, cls_score, bbox_pred, img_shape, scale_factor, prop_valid):
        post = lambda r, c, d, i, sf, v: det.bbox_postprocess(r, c, d, i, sf, v)[0]
        return jax.vmap(post)(props, cls_score, bbox_pred, img_shape, scale_factor, prop_valid)

    @jax.jit
    def mask_head(variables, feats, dets, scale_factor):
        b, k = dets.boxes.shape[:2]
        rescaled = dets.boxes * scale_factor[:, None, :]
        mask_valid = dets.valid & (rescaled[..., 3] != 0)
        kidx = jnp.repeat(jnp.arange(b, dtype=jnp.float32), k)[:, None]
        mrois = jnp.concatenate([kidx, rescaled.reshape(b * k, 4)], axis=1)
        logits = det.mask_forward(variables, feats, mrois)
        labels = jnp.maximum(dets.labels, 0).reshape(b * k)
        label_logits = jnp.take_along_axis(logits, labels[:, None, None, None], axis=3)[..., 0]
        probs = jax.nn.sigmoid(label_logits).reshape(b, k, *label_logits.shape[1:])
        return probs, rescaled / scale_factor[:, None, :], mask_valid

    def s_rpn(s):
        rpn_out = rpn_head(s["variables"], s["feats"])
        props, scores, valid = proposals(rpn_out, s["images"], s["img_shape"])
        return dict(s, props=props, prop_valid=valid)

    def s_box(s):
        return dict(s, box=box_head(s["variables"], s["feats"][:4], s["props"]))

    def s_nms(s):
        return dict(s, dets=nms(s["props"], *s["box"], s["img_shape"], s["scale_factor"], s["prop_valid"]))

    def s_mask(s):
        return dict(s, masks=mask_head(s["variables"], s["feats"][:4], s["dets"], s["scale_factor"]))

    def s_paste(s):
        probs, boxes, valid = s["masks"]
        return dict(s, pasted=det.paste(probs[0], boxes[0], s["ori_hw"], valid[0]))

    def finish(s):
        d = s["dets"]
        out = {k: np.asarray(getattr(d, k))[0] for k in ("boxes", "scores", "labels", "valid")}
        out["masks"] = s["pasted"]
        return out

    return StagedInference([("backbone", s_backbone), ("FPN", s_neck), ("RPN + proposals", s_rpn),
                            ("RoI box head", s_box), ("NMS", s_nms), ("RoI mask head", s_mask),
                            ("mask paste", s_paste)], finish)


# -- training ---------------------------------------------------------------------------------------------------
class TrainPart(NamedTuple):
    """One separately compiled part of the Mask R-CNN loss + gradient.

    ``fn`` is a compiled executable, called as ``fn(*args)`` (the args are the part's real inputs, produced by the
    parts before it); ``flops`` from its ``cost_analysis()`` (XLA counts a loop body once: RoIAlign's sample loop
    and the NMS loops are undercounted); ``kind`` is ``'fwd'``, ``'fwd+bwd'`` (a ``vjp``: forward recomputed, then
    the backward) or ``'no grad'``; ``in_total``: the part belongs to the partition of ``jit(value_and_grad(loss))``
    (the ``'fwd+bwd'`` and ``'no grad'`` parts; a ``'fwd'`` part is shown for its forward share only).
    """
    name: str
    fn: Callable
    args: tuple
    flops: float
    kind: str
    in_total: bool


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


class StagedTrain:
    """The Mask R-CNN training loss split into separately jitted parts (:func:`staged_train`).

    ``parts``: the :class:`TrainPart` list, in the order the loss runs them; ``loss_and_grad(params,
    batch_stats)`` composes the same compiled pieces (forwards, then the ``vjp`` of each part in reverse order) into
    ``(total loss, {term: value}, grads, new batch_stats)`` -- what ``jax.value_and_grad(detector.loss)`` gives,
    up to float summation order (tested in ``tests/scripts/test_benchmark_train_breakdown.py``).
    """

    def __init__(self, det, variables, batch, rng):
        self.det = det
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.rng = rng
        self._build(variables)

    # Each function below is one part; ``_compile`` lowers it on its real arguments once.
    def _compile(self, fn, *args):
        compiled = jax.jit(fn).lower(*args).compile()
        return compiled, _flops(compiled)

    def _build(self, variables):
        from lit_jax.models.mask_rcnn import MaskRCNNModule

        det, batch = self.det, self.batch
        canvas = tuple(batch["images"].shape[1:3])
        self.canvas = canvas
        k_drop, k_rpn, k_roi = jax.random.split(self.rng, 3)
        self.keys = (k_drop, k_rpn, k_roi)
        mod = det.module

        def backbone(p, bs, images, key):
            out, upd = mod.apply({"params": {"backbone": p}, "batch_stats": bs}, images,
                                 method=lambda m, x: m.backbone(x, train=True), mutable=["batch_stats"],
                                 rngs={"dropout": key})
            return out, upd["batch_stats"]

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
        self.compiled = {}
        self.parts = []
        self._run(variables["params"], variables.get("batch_stats", {}), record=True)

    def _call(self, key, fn, *args, record=False, name=None, kind="fwd", in_total=False):
        if key not in self.compiled:
            self.compiled[key] = self._compile(fn, *args)
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

    def whole(self):
        """The uncut ``value_and_grad(detector.loss)`` on the same batch and rng, as a function of
        ``(params, batch_stats)`` (jit it to compare or time it)."""
        det, batch, rng = self.det, self.batch, self.rng

        def loss_and_grad(params, batch_stats):
            return jax.value_and_grad(lambda p: det.loss({"params": p, "batch_stats": batch_stats}, batch, rng),
                                      has_aux=True)(params)

        return loss_and_grad


def staged_train(det, variables, batch, rng) -> StagedTrain:
    """The Mask R-CNN training loss (:meth:`lit_jax.models.mask_rcnn.MaskRCNN.loss`) on ``batch`` split into
    separately compiled parts: backbone, FPN, RPN head (forward, and forward+backward as a ``vjp``), RPN targets,
    proposals, RoI assign + sample, bbox RoIAlign 7x7 (forward, forward+backward), box head, mask targets, mask
    RoIAlign 14x14, mask head, losses. Compiles every part once and runs it once to produce the next part's inputs.
    """
    if not hasattr(det, "rpn_train_targets"):
        raise ValueError(f"the train-step breakdown is for Mask R-CNN; got {type(det).__name__}")
    return StagedTrain(det, variables, batch, rng)


def time_rounds(runners: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Alternates the runners (each one call that blocks until ready), the order flipped every round; returns the
    wall seconds of each runner's timed calls."""
    out = {k: [] for k in runners}
    order = list(runners)
    for i in range(warmup + rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            runners[name]()
            if i >= warmup:
                out[name].append(time.perf_counter() - t0)
    return out


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
