"""What a user points a detector at: image files, folders, globs, RGB arrays, video files.

Each input becomes an :class:`ImageInput` (a name and a loader) so that one bad file is reported by name
and the others still run. Images are decoded as mmcv does (``cv2.imdecode(IMREAD_COLOR)``, EXIF orientation
applied) and handed on as RGB uint8.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


class InputError(ValueError):
    """An input that cannot be read (missing, not an image, an empty folder, a video that does not open);
    ``name`` is the input as the user gave it."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """name: the file path (or ``array[i]``); load(): the image as RGB uint8 ``(H, W, 3)``."""
    name: str
    load: Callable[[], np.ndarray]


def read_image(path: str) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)``; InputError naming the file when it is missing or undecodable."""
    import cv2

    from lit_jax.data.image import decode_bgr

    if not os.path.isfile(path):
        raise InputError(f"image {path} does not exist", path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        bgr = decode_bgr(data, path)
    except ValueError as err:
        raise InputError(str(err), path) from None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def is_video(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def expand(inputs: Union[str, os.PathLike, np.ndarray, Sequence[Any]]) -> list:
    """The images named by ``inputs``: a path, a folder (its image files, sorted, not recursive), a glob, an
    ``(H, W, 3)`` uint8 RGB array, or a list of these. Returns ImageInput items in order, with an InputError
    in place of each input that names nothing readable (a missing path, an empty folder, a glob without
    matches, a video, an array of the wrong kind)."""
    if isinstance(inputs, np.ndarray) and inputs.ndim == 3:
        inputs = [inputs]
    elif isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list = []
    for i, item in enumerate(inputs):
        if isinstance(item, np.ndarray):
            out.append(_array_input(item, f"array[{i}]"))
        elif isinstance(item, (str, os.PathLike)):
            out.extend(_path_inputs(os.fspath(item)))
        else:
            out.append(InputError(f"input {i} is a {type(item).__name__}; give a path, a folder, a glob or an "
                                  "(H, W, 3) uint8 RGB array", f"input[{i}]"))
    return out


def _array_input(arr: np.ndarray, name: str):
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        return InputError(f"{name}: an image array must be (H, W, 3) uint8 RGB, got {arr.dtype} {arr.shape}", name)
    return ImageInput(name, lambda: arr)


def _file_input(path: str) -> ImageInput:
    return ImageInput(path, lambda: read_image(path))


def _path_inputs(path: str) -> list:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            return [InputError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})", path)]
        return [_file_input(f) for f in files]
    if is_video(path):
        return [InputError(f"{path} is a video; read its frames with lit_jax.inference.video_frames", path)]
    if os.path.exists(path):
        return [_file_input(path)]
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            return [InputError(f"no file matches {path}", path)]
        return [_file_input(f) for f in files]
    return [InputError(f"image {path} does not exist", path)]


def video_frames(path: str) -> tuple[float, Iterator[np.ndarray]]:
    """``(fps, frames)`` of a video file; frames are RGB uint8. InputError naming the file when OpenCV cannot
    open it."""
    import cv2

    if not os.path.isfile(path):
        raise InputError(f"video {path} does not exist", path)
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise InputError(f"video {path} does not open with OpenCV", path)
    ok, first = cap.read()
    if not ok:
        cap.release()
        raise InputError(f"video {path} opens but holds no readable frame", path)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0

    def frames() -> Iterator[np.ndarray]:
        try:
            frame = first
            while frame is not None:
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                ok_, frame = cap.read()
                if not ok_:
                    break
        finally:
            cap.release()

    return fps, frames()
