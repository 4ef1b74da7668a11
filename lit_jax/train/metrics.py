"""Console progress (tqdm: ETA, loss) and TensorBoard scalars for the training loop (process 0 only).

Event files are written with ``tf.summary`` (TensorFlow is already there for the input pipeline).
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np


class MetricLogger:
    """Averages step metrics over ``every`` steps and writes them to TensorBoard event files.

    Written under ``workdir/tensorboard``: each loss term, lr, grad_norm, num_pos, step time (s) and
    images/s. The console shows a progress bar with ETA and the latest averaged loss.
    """

    def __init__(self, workdir: str, *, total: int, initial: int = 0, enabled: bool = True, every: int = 50,
                 images_per_step: int = 1):
        self.enabled = enabled
        self.every = max(1, every)
        self.images_per_step = images_per_step
        self._sums: dict[str, float] = {}
        self._count = 0
        self._t_window = time.perf_counter()
        self._writer = None
        self._bar = None
        if enabled:
            import tensorflow as tf
            from tqdm import tqdm

            self._tf = tf
            self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=2.0)

    def log(self, step: int, metrics: Mapping[str, object]) -> None:
        """Record the metrics of ``step`` (device arrays are read here, one step after dispatch)."""
        if not self.enabled:
            return
        for k, v in metrics.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(np.asarray(v))
        self._count += 1
        self._bar.update(1)
        if step % self.every == 0:
            now = time.perf_counter()
            step_time = (now - self._t_window) / self._count
            avg = {k: v / self._count for k, v in self._sums.items()}
            avg["step_time"] = step_time
            avg["images_per_sec"] = self.images_per_step / step_time if step_time > 0 else 0.0
            self.scalars(step, {f"train/{k}": v for k, v in avg.items()})
            self._bar.set_postfix(loss=f"{avg['loss']:.4f}", lr=f"{avg.get('lr', 0):.2e}",
                                  img_s=f"{avg['images_per_sec']:.1f}")
            self._sums, self._count, self._t_window = {}, 0, now

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default():
            for k, v in values.items():
                self._tf.summary.scalar(k, float(v), step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
