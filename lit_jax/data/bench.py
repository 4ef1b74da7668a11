"""Input pipeline throughput (host-local numpy batches, images/s).

    python -m lit_jax.data.bench                                  # synthetic data, 1333x800
    python -m lit_jax.data.bench --data_dir data/tfds --dataset coco_instances/coco --masks
    python -m lit_jax.data.bench --backend tf --compare_resize     # the pure-TF decode/resize

Without --dataset, a synthetic COCO-format set is generated and built in a temporary directory.
--compare_resize also reports how far tf.image.resize (float bilinear) is from cv2's fixed-point
INTER_LINEAR on the dataset's images (mean / max absolute difference in uint8 levels).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def compare_resize(source, split: str, scale, limit: int = 64) -> dict[str, float]:
    import numpy as np
    import tensorflow as tf
    from lit_jax.data import transforms as T
    diffs, maxd, frac = [], 0, []
    for k, e in enumerate(source.records(split).take(limit).as_numpy_iterator()):
        a, _ = T.decode_resize(tf.constant(e["image"]), tf.constant(e["filename"]), scale, "cv2")
        b, _ = T.decode_resize(tf.constant(e["image"]), tf.constant(e["filename"]), scale, "tf")
        d = np.abs(a.numpy().astype(np.int32) - b.numpy().astype(np.int32))
        diffs.append(d.mean())
        frac.append((d > 0).mean())
        maxd = max(maxd, int(d.max()))
    return {"images": len(diffs), "mean_abs_diff": float(np.mean(diffs)), "max_abs_diff": maxd,
            "fraction_differing": float(np.mean(frac))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--dataset", default=None, help="e.g. coco_instances/coco; default: synthetic")
    p.add_argument("--split", default="train")
    p.add_argument("--scale", type=int, nargs=2, default=(1333, 800), metavar=("LONG", "SHORT"))
    p.add_argument("--batch", type=int, default=2, help="images per batch (one process)")
    p.add_argument("--steps", type=int, default=40, help="timed batches (after 5 warm-up batches)")
    p.add_argument("--masks", action="store_true", help="also produce mask crops")
    p.add_argument("--backend", default="cv2", choices=["cv2", "tf"])
    p.add_argument("--synthetic_images", type=int, default=48)
    p.add_argument("--compare_resize", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from lit_jax.data import coco_builder
    from lit_jax.data import pipeline as P
    from lit_jax.data.synthetic import make_synthetic_coco

    tmp = None
    if args.dataset is None:
        tmp = tempfile.TemporaryDirectory(prefix="lit_jax_bench_")
        src_dir = os.path.join(tmp.name, "synthetic_coco")
        make_synthetic_coco(src_dir, num_train=args.synthetic_images, num_val=4, seed=0)
        data_dir = os.path.join(tmp.name, "tfds")
        coco_builder.build(src_dir, data_dir, "synthetic")
        dataset = "coco_instances/synthetic"
    else:
        data_dir, dataset = args.data_dir or coco_builder.default_data_dir(), args.dataset
    cfg = P.DataConfig(data_dir=data_dir, dataset=dataset, train_split=args.split, img_scale=tuple(args.scale),
                       global_batch_size=args.batch, with_masks=args.masks, decode_backend=args.backend)
    td = P.make_train_dataset(cfg, process_index=0, process_count=1)
    it = td.numpy_batches()
    for _ in range(5):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        b = next(it)
    dt = time.perf_counter() - t0
    n = args.steps * args.batch
    print(f"dataset {dataset} split {args.split}, scale {tuple(args.scale)}, canvases "
          f"{cfg.resolved_canvases()}, batch {args.batch}, masks {args.masks}, backend {args.backend}, "
          f"{os.cpu_count()} CPUs")
    print(f"throughput: {n / dt:.1f} images/s ({n} images in {dt:.2f} s; batch images "
          f"{b['images'].shape} float32)")
    if args.compare_resize:
        r = compare_resize(td.source, args.split, tuple(args.scale))
        print(f"tf.image.resize vs cv2 INTER_LINEAR (uint8, {r['images']} images): mean abs diff "
              f"{r['mean_abs_diff']:.4f} levels, max {r['max_abs_diff']}, "
              f"{100 * r['fraction_differing']:.1f}% of values differ")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
