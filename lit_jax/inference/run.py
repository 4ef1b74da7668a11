"""Predict over files, folders, globs and videos: drawn images or videos, COCO results JSON, a summary.

What ``scripts/predict.py`` runs; usable from Python as ``run_predictions(det, inputs, ...)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Optional, Sequence

import numpy as np

from lit_jax.inference.detector import Detector, Result
from lit_jax.inference.inputs import InputError, is_video, read_image, video_frames

log = logging.getLogger(__name__)

DRAW_THR = 0.3  # mmdet's show_result default


@dataclasses.dataclass
class RunSummary:
    """images: images (and video frames) detected; errors: ``'name: message'`` of inputs that failed;
    seconds: wall time of the whole run; outputs: files written."""
    images: int = 0
    errors: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    outputs: list = dataclasses.field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def image_id_for(name: str, index: int) -> int:
    """COCO ``image_id`` of a file: its stem when that is a number (COCO's ``000000000139.jpg``), else
    ``index`` (the 1-based position in the run)."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return int(stem) if stem.isdigit() else index


def run_predictions(det: Detector, inputs: Sequence[str], *, out_dir: Optional[str] = None,
                    json_path: Optional[str] = None, score_thr: Optional[float] = None,
                    classes: Optional[Sequence[str]] = None, progress: bool = True) -> RunSummary:
    """Runs ``det`` on every input (files, folders, globs, videos).

    Drawn images go to ``out_dir/<name>.png`` (a video to ``out_dir/<stem>.mp4``, one drawn frame per frame),
    detections above ``score_thr`` (all of them when None, drawing then uses 0.3) of the ``classes`` named (all
    when None) to ``json_path`` as one COCO results list. An input that cannot be read is reported in
    ``errors`` and the run goes on.
    """
    from tqdm import tqdm

    unknown = sorted(set(classes or ()) - set(det.class_names))
    if unknown:
        raise ValueError(f"--classes {unknown} are not classes of this detector; it knows {det.class_names}")
    wanted = None if classes is None else {det.class_names.index(c) for c in classes}
    draw_thr = DRAW_THR if score_thr is None else score_thr
    summary, entries = RunSummary(), []
    start = time.perf_counter()
    bar = tqdm(total=None, unit="img", disable=not progress)

    def filtered(r: Result) -> Result:
        keep = np.ones(len(r), bool)
        if score_thr is not None:
            keep &= r.scores > score_thr
        if wanted is not None:
            keep &= np.isin(r.labels, list(wanted))
        return r.select(keep)

    images = [p for p in inputs if not is_video(p)]
    videos = [p for p in inputs if is_video(p)]
    for name, r in det.stream(images):
        if isinstance(r, InputError):
            summary.errors.append(str(r))
            continue
        r = filtered(r)
        summary.images += 1
        bar.update(1)
        entries.extend(r.to_coco(image_id_for(name, summary.images)))
        if out_dir:
            out_path = os.path.join(out_dir, os.path.splitext(os.path.basename(name))[0] + ".png")
            summary.outputs.append(_draw(det, read_image(name), r, out_path, draw_thr))
    for path in videos:
        try:
            fps, frames = video_frames(path)
        except InputError as err:
            summary.errors.append(str(err))
            continue
        writer = None
        out_path = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".mp4") if out_dir else None
        for frame in frames:
            (r,) = det([frame])
            r = filtered(r)
            summary.images += 1
            bar.update(1)
            entries.extend(r.to_coco(summary.images))
            if out_path:
                writer = writer or _video_writer(out_path, fps, frame.shape[:2])
                drawn = _drawn(det, frame, r, draw_thr)
                writer.write(drawn[..., ::-1].copy())
        if writer is not None:
            writer.release()
            summary.outputs.append(out_path)
    bar.close()
    if json_path:
        parent = os.path.dirname(os.path.abspath(json_path))
        os.makedirs(parent, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(entries, f)
        summary.outputs.append(json_path)
    summary.seconds = time.perf_counter() - start
    return summary


def _drawn(det: Detector, rgb: np.ndarray, r: Result, thr: float) -> np.ndarray:
    from lit_jax.evaluation.visualize import draw_detections

    return draw_detections(rgb, r.boxes, r.scores, r.labels, det.class_names, score_thr=thr, masks=r.masks)


def _draw(det: Detector, rgb, r: Result, path: str, thr: float) -> str:
    from lit_jax.evaluation.visualize import save_image

    return save_image(path, _drawn(det, rgb, r, thr))


def _video_writer(path: str, fps: float, hw: tuple):
    import cv2

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (int(hw[1]), int(hw[0])))
    if not writer.isOpened():
        raise OSError(f"cannot write video {path} (OpenCV's mp4v writer did not open)")
    return writer
