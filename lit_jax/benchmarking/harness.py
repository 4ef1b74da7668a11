"""The benchmark modes, end to end: what ``scripts/benchmark.py`` runs for its flags (an argparse namespace).

:func:`measure` dispatches on the flags and appends one JSON record per measurement to ``args.out``
(:mod:`~lit_jax.benchmarking.records`: environment, config and overrides, mode, size, batch, dtype, the numbers):
  backbone / infer / train on synthetic images (:func:`measure_synthetic`; what each mode times:
      :mod:`~lit_jax.benchmarking.setups`): lower + compile time (no persistent compilation cache unless
      JAX_COMPILATION_CACHE_DIR is set; recorded), warm-up steps, then ``args.steps`` timed steps, each ended by
      ``block_until_ready``: median, p10 / p90 step time, images/s, process CPU seconds per step, peak memory and
      FLOPs per image (:mod:`~lit_jax.benchmarking.costs`: where they come from), achieved FLOP/s (and MFU with
      ``--peak-flops``);
  infer --image (:func:`measure_image`): the whole user path on an image file (preprocessing as
      scripts/predict.py, ``jit(predict)``, the mask paste at the original size, results on the host) and the same
      computation as separately jitted stages (:mod:`~lit_jax.benchmarking.inference_stages`), in alternating
      rounds (/ the torch forward), with the number of XLA compilations (first call; 0 during the timed rounds
      means no recompilation);
  train --breakdown (:func:`measure_train_breakdown`): the Mask R-CNN loss + gradient in separately compiled parts
      (:mod:`~lit_jax.benchmarking.train_stages`), timed with the whole loss + gradient and the whole train step,
      and checked against them; ``--baseline KEY=VALUE`` adds a second build of the model to the same rounds.
With ``--compare-torch`` (backbone, infer) the PyTorch reference runs on the same input and converted weights
(:mod:`~lit_jax.benchmarking.torch_reference`; ``torch.set_num_threads`` = the cores XLA uses, ``torch.no_grad``):
the outputs are compared and JAX and torch steps alternate round by round (:func:`compare`).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.benchmarking.costs import chunking_active, count_flops, flops_of, host_rss_peak, peak_memory, unchunked
from lit_jax.benchmarking.inference_stages import preprocess_bytes, staged_inference
from lit_jax.benchmarking.records import append_jsonl, describe, record, run_settings
from lit_jax.benchmarking.setups import (Setup, parse_size, setup_backbone, setup_infer, setup_train,
                                         synthetic_images)
from lit_jax.benchmarking.timing import CompileWatch, compile_timed, run_rounds, summarize
from lit_jax.benchmarking.torch_reference import (TorchComparison, import_lit_torch, max_rel_diff, torch_flat,
                                                  torch_reference)
from lit_jax.benchmarking.train_stages import compare_composed, format_train_breakdown, staged_train, train_breakdown


def measure(args, config) -> list[dict]:
    """Runs the measurements the flags ask for and appends their records to ``args.out``; returns the records (each
    also printed)."""
    if args.cores:  # before the XLA client and torch size their thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    # --image: the canvas comes from the image and data.img_scale (measure_image).
    hw = parse_size(args.size, config) if not args.image else (0, 0)
    mode = args.mode
    batch = args.batch or (int(config.data.global_batch_size) if mode == "train" else 1)
    rng = np.random.default_rng(args.seed)
    torch_threads = None
    if args.compare_torch:
        if mode == "train":
            raise SystemExit("error: --compare-torch: the reference has no training step; use backbone or infer")
        torch = _reference_torch()
        torch_threads = args.torch_threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(torch_threads)
    base = run_settings(args, config, hw, batch, torch_threads)
    size_text = f"{hw[0]}x{hw[1]}" if not args.image else "from the image"
    print(f"{base['config']} mode={mode} size={size_text} batch={batch} dtype={base['dtype']} on "
          f"{base['device_kind']} ({base['cpu_cores']} cores, jax {base['jax']}, load {base['loadavg_1m']})",
          flush=True)

    if args.baseline and not args.breakdown:
        raise SystemExit("error: --baseline is for --mode train --breakdown")
    if args.breakdown:
        if mode != "train":
            raise SystemExit("error: --breakdown is for --mode train (--mode infer --image has its own stages)")
        records = measure_train_breakdown(args, config, base, hw, batch, rng)
    elif args.image:
        if mode != "infer":
            raise SystemExit("error: --image is for --mode infer")
        records = measure_image(args, config, base)
    else:
        records = measure_synthetic(args, config, base, hw, batch, rng)
    append_jsonl(args.out, records)
    print(f"appended {len(records)} record(s) to {args.out}")
    return records


def _reference_torch():
    """torch, once the PyTorch reference is known to import (else a SystemExit saying how to make it importable)."""
    try:
        import_lit_torch()
    except ImportError as err:
        raise SystemExit(f"error: --compare-torch: {err}") from None
    import torch

    return torch


def measure_synthetic(args, config, base: dict, hw, batch: int, rng) -> list[dict]:
    """``--mode backbone / infer / train`` on synthetic images ``(batch, *hw, 3)``: one JAX record, and with
    ``--compare-torch`` the JAX and torch records of :func:`compare`."""
    mode = args.mode
    with tempfile.TemporaryDirectory(prefix="lit_jax_bench_") as tmp:
        images = synthetic_images(rng, batch, hw)
        comparison = torch_reference(config, mode, images, tmp) if args.compare_torch else None
        variables = comparison.variables if comparison else None
        if mode == "backbone":
            setup = setup_backbone(config, images, variables)
        elif mode == "infer":
            setup = setup_infer(config, images, variables)
        else:
            setup = setup_train(config, images, rng)

        compiled, lower_s, compile_s = compile_timed(setup.jitted, *setup.args)
        flops, flops_source = count_flops(compiled, setup.build, config, setup.args)
        state = {"args": setup.args}

        def jax_step():
            out = compiled(*state["args"])
            jax.block_until_ready(out)
            if mode == "train":  # the state is donated: carry the new one
                state["args"] = (out[0],) + tuple(state["args"][1:])

        timing = run_rounds({"jax": jax_step}, args.steps, args.warmup)["jax"]
        peak, peak_source = peak_memory(compiled)
        records = [record(base, "jax", setup.what, timing, setup.images_per_step, lower_s=lower_s,
                          compile_s=lower_s + compile_s, flops_per_image=flops / setup.images_per_step,
                          flops_source=flops_source, peak_memory_bytes=peak, peak_memory_source=peak_source,
                          host_rss_peak_bytes=host_rss_peak())]
        print(describe(records[-1]), flush=True)
        if comparison is not None:
            main = (compiled, lower_s + compile_s, flops, flops_source) if comparison.build_jax is None else None
            records += compare(comparison, config, base, args, setup, main)
    return records


def measure_image(args, config, base: dict) -> list[dict]:
    """``--mode infer --image``: end to end vs the staged breakdown (vs the torch forward), alternating rounds."""
    from lit_jax.models.registry import build_detector

    if not os.path.isfile(args.image):
        raise SystemExit(f"error: --image {args.image} does not exist")
    with open(args.image, "rb") as f:
        data = f.read()
    img_scale = tuple(int(v) for v in config.data.img_scale)
    try:  # an undecodable file: decode_bgr's ValueError names it
        images, img_shape, scale_factor, ori = preprocess_bytes(data, img_scale, name=args.image)
    except ValueError as err:
        raise SystemExit(f"error: --image: {err}") from None
    base = dict(base, image=os.path.abspath(args.image), ori_shape=list(ori), size=list(images.shape[1:3]), batch=1)
    print(f"image {args.image} {ori[0]}x{ori[1]} -> canvas {images.shape[1]}x{images.shape[2]}", flush=True)
    det = build_detector(config.model)
    with tempfile.TemporaryDirectory(prefix="lit_jax_bench_") as tmp:
        comparison = torch_reference(config, "infer", images, tmp) if args.compare_torch else None
        if comparison is not None:
            variables = comparison.variables
        else:
            variables = jax.jit(lambda k: det.init(k, (128, 128)))(jax.random.PRNGKey(args.seed))
        predict = jax.jit(det.predict)

        def end_to_end():
            imgs, shape, sf, ori_hw = preprocess_bytes(data, img_scale, name=args.image)
            out = predict(variables, imgs, {"img_shape": shape, "scale_factor": sf})
            host = {k: np.asarray(getattr(out, k)[0]) for k in ("boxes", "scores", "labels", "valid")}
            if out.has_masks:
                host["masks"] = det.paste(out.mask_probs[0], out.mask_boxes[0], ori_hw, out.mask_valid[0])
            return host

        staged = staged_inference(det)
        stage_times: dict[str, list[float]] = {}

        def stages():
            t0 = time.perf_counter()
            imgs, shape, sf, ori_hw = preprocess_bytes(data, img_scale, name=args.image)
            pre = time.perf_counter() - t0
            host, times = staged.run(variables, imgs, shape, sf, ori_hw)
            for name, t in [("preprocessing", pre)] + list(times.items()):
                stage_times.setdefault(name, []).append(t)
            return host

        with CompileWatch() as first_watch:
            t0 = time.perf_counter()
            first = end_to_end()
            first_s = time.perf_counter() - t0
        compiles_first = first_watch.count
        staged_first = stages()
        stage_times.clear()
        for k in ("boxes", "scores", "valid"):  # the stages compute what predict computes
            if not np.allclose(first[k], staged_first[k], rtol=1e-4, atol=1e-3):
                print(f"warning: staged {k} differ from predict's", file=sys.stderr)
        runners = {"jax": end_to_end, "stages": stages}
        if comparison is not None:
            import torch

            def torch_step():
                with torch.no_grad():
                    comparison.torch_fn()
            runners["torch"] = torch_step
        with CompileWatch() as rounds_watch:
            timing = run_rounds(runners, args.steps, args.warmup)
    share_total = sum(statistics.median(v) for v in stage_times.values())
    breakdown = {k: {"median_s": statistics.median(v), "share": statistics.median(v) / share_total}
                 for k, v in stage_times.items()}
    paste = " -> mask paste" if "masks" in first else ""
    what = f"end to end: image file -> preprocess -> jit(predict){paste} -> host"
    extra = dict(first_call_s=first_s, compiled_functions_first_call=compiles_first,
                 compilations_during_rounds=rounds_watch.count, stages=breakdown, stages_sum_s=share_total,
                 detections=int(first["valid"].sum()))
    recs = [record(base, "jax", what, timing["jax"], 1, **extra)]
    print(describe(recs[-1]), flush=True)
    print(f"first call {first_s:.1f} s, {compiles_first} compiled functions; {rounds_watch.count} compilations during "
          f"the timed rounds", flush=True)
    print(f"stages (separately jitted, medians; sum {share_total:.3f} s):", flush=True)
    for k, v in breakdown.items():
        print(f"  {k:18s} {v['median_s'] * 1e3:9.1f} ms  {100 * v['share']:5.1f}%", flush=True)
    if comparison is not None:
        ratio = summarize(timing["torch"]["step_s"])["median"] / recs[0]["step_s"]["median"]
        recs[0]["torch_forward_over_jax_end_to_end"] = ratio
        recs.append(record(base, "torch", comparison.what, timing["torch"], 1))
        print(describe(recs[-1]), flush=True)
        print(f"torch network forward / jax end to end (median): {ratio:.2f}x", flush=True)
    return recs


def measure_train_breakdown(args, config, base: dict, hw, batch: int, rng) -> list[dict]:
    """``--mode train --breakdown``: the parts of the Mask R-CNN loss + gradient, the whole loss + gradient and the
    whole train step, alternating rounds (``lit_jax.benchmarking.train_breakdown``); one record."""
    if config.model.get("type", "retinanet") != "mask_rcnn":
        raise SystemExit(f"error: --breakdown splits the Mask R-CNN train step; {args.config} builds a "
                         f"{config.model.get('type', 'retinanet')} (time its whole train step without --breakdown)")
    setup = setup_train(config, synthetic_images(rng, batch, hw), rng)
    compiled_step, lower_s, compile_s = compile_timed(setup.jitted, *setup.args)
    state, data = setup.args
    # The train step donates the state: the parts and the whole loss get their own copy of the variables.
    params = jax.tree_util.tree_map(jnp.copy, state.params)
    batch_stats = jax.tree_util.tree_map(jnp.copy, state.batch_stats)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)  # the train step's first key
    variables = {"params": params, "batch_stats": batch_stats}
    flops_det = _flops_detector(config)
    t0 = time.perf_counter()
    staged = staged_train(setup.detector, variables, data, key, flops_det=flops_det)
    parts_compile_s = time.perf_counter() - t0
    whole, w_lower, w_compile = compile_timed(jax.jit(staged.whole()), params, batch_stats)
    whole_flops = _whole_flops(staged, whole, flops_det, params, batch_stats)
    step_flops = count_flops(compiled_step, setup.build, config, setup.args)[0]
    baseline = _baseline(args.baseline, config, variables, data, key) if args.baseline else None
    check = compare_composed(staged, whole, params, batch_stats)
    print(f"parts composed vs the whole loss + grad: loss {check['loss']:.6f}, rel diff {check['loss_rel_diff']:.1e}; "
          f"max grad diff / max |grad| {check['grad_max_diff_rel']:.1e} (at {check['grad_worst_leaf']})", flush=True)
    carry = {"state": state}

    def step():
        new, _ = compiled_step(carry["state"], data)
        carry["state"] = jax.block_until_ready(new)

    res = train_breakdown(staged, whole, whole_flops, params, batch_stats, args.steps, args.warmup,
                          train_step=(step, step_flops), baseline=baseline)
    print(f"{len(staged.parts)} parts compiled in {parts_compile_s:.1f} s; whole loss + grad "
          f"{w_lower + w_compile:.1f} s;"
          f" train step {lower_s + compile_s:.1f} s; medians of {args.steps} alternating rounds, load now "
          f"{os.getloadavg()[0]:.2f}:", flush=True)
    for line in format_train_breakdown(res):
        print(line, flush=True)
    rec = record(base, "jax", "train step breakdown (Mask R-CNN loss + grad in separately jitted parts)",
                 {"step_s": res["whole"]["times_s"], "cpu_s": [], "warmup_s": []}, batch, breakdown=res,
                 composed_check=check, baseline_overrides=args.baseline, parts_compile_s=parts_compile_s,
                 whole_compile_s=w_lower + w_compile,
                 train_step_compile_s=lower_s + compile_s, flops_per_image=whole_flops / batch,
                 loadavg_1m_end=os.getloadavg()[0])
    return [rec]


def _baseline(overrides: list[str], config, variables: dict, data: dict, key) -> tuple:
    """``--baseline``: the model built with ``overrides`` (``KEY=VALUE``) as the trainer builds it, staged on the
    same weights, batch and key -> ``(staged, compiled whole loss + grad, its FLOPs)``."""
    import copy

    from lit_jax.config import apply_override

    b_config = copy.deepcopy(config)
    for item in overrides:
        dotted, sep, text = item.removeprefix("--config.").partition("=")
        if not sep:
            raise SystemExit(f"error: --baseline takes KEY=VALUE, got {item!r}")
        apply_override(b_config, dotted, text)
    flops_det = _flops_detector(b_config)
    b_staged = staged_train(_trainer_detector(b_config), variables, data, key, flops_det=flops_det)
    params, batch_stats = variables["params"], variables["batch_stats"]
    b_whole = compile_timed(jax.jit(b_staged.whole()), params, batch_stats)[0]
    b_check = compare_composed(b_staged, b_whole, params, batch_stats)
    print(f"baseline ({', '.join(overrides)}): loss {b_check['loss']:.6f}", flush=True)
    return b_staged, b_whole, _whole_flops(b_staged, b_whole, flops_det, params, batch_stats)


def _trainer_detector(config):
    """The detector as the trainer builds it from ``config``."""
    from lit_jax.train.trainer import Trainer

    return Trainer(config, tempfile.mkdtemp(prefix="lit_jax_bench_")).detector


def _flops_detector(config):
    """The detector without the backbone's chunk loops, to count FLOPs XLA would count once per loop (None when
    ``config`` runs no chunk loop)."""
    return _trainer_detector(unchunked(config)) if chunking_active(config) else None


def _whole_flops(staged, whole_compiled, flops_det, params, batch_stats) -> float:
    """FLOPs of the whole loss + gradient: lowered on ``flops_det`` when given, else the compiled one's."""
    if flops_det is None:
        return flops_of(whole_compiled)
    return flops_of(jax.jit(staged.whole(flops_det)).lower(params, batch_stats))


def compare(cmp: TorchComparison, config, base: dict, args, setup: Setup, main=None) -> list[dict]:
    """JAX vs torch on the same input, alternating rounds; returns the two records with the ratio.

    ``main``: ``(compiled, compile seconds, flops, flops source)`` of the measured function when the comparison
    times that same function (backbone mode); otherwise the comparison's JAX function is compiled here.
    """
    import torch

    jax_args = setup.args[:2]  # (variables, images)
    if main is None:
        build = cmp.build_jax
        compiled, lower_s, compile_s = compile_timed(build(config), *jax_args)
        compile_total = lower_s + compile_s
        flops, flops_source = count_flops(compiled, build, config, jax_args)
    else:
        compiled, compile_total, flops, flops_source = main
    jax_out = cmp.to_flat(jax.device_get(compiled(*jax_args)))
    with torch.no_grad():
        torch_out = torch_flat(cmp.torch_fn())
    diff = max_rel_diff(jax_out, torch_out)
    print(f"outputs agree: max |jax - torch| / max |torch| = {diff:.2e} (over {len(torch_out)} outputs)", flush=True)

    def jax_step():
        jax.block_until_ready(compiled(*jax_args))

    def torch_step():
        with torch.no_grad():
            cmp.torch_fn()

    timing = run_rounds({"jax": jax_step, "torch": torch_step}, args.steps, args.warmup)
    med = {k: summarize(v["step_s"])["median"] for k, v in timing.items()}
    ratio = med["torch"] / med["jax"]
    common = dict(max_rel_diff=diff, torch_over_jax=ratio, compared=True,
                  flops_per_image=flops / setup.images_per_step, flops_source=flops_source + " (JAX's count)")
    recs = [record(base, "jax", cmp.what, timing["jax"], setup.images_per_step, compile_s=compile_total, **common),
            record(base, "torch", cmp.what, timing["torch"], setup.images_per_step, **common)]
    for r in recs:
        print(describe(r), flush=True)
    print(f"torch / jax median step time: {ratio:.2f}x", flush=True)
    return recs
