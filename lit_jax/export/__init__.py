"""Export a trained detector for serving: a TensorFlow SavedModel or a serialized StableHLO (``jax.export``).

    from lit_jax.export import export_detector
    export_detector("configs/retinanet_lit_ti_fpn_1x_coco.py", "retinanet_lit_ti_1x.pth", "saved_model", "out/")

Both formats hold one fixed canvas and batch; their input is uint8 (normalisation inside), see
:mod:`lit_jax.export.serving`. Layouts, reload snippets, sizes and limits: docs/export.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional, Sequence, Union

FORMATS = ("saved_model", "stablehlo")
DTYPES = ("float32", "bfloat16")
METADATA = "lit_jax_export.json"
CLASS_NAMES = "class_names.txt"


class ExportError(ValueError):
    """An export request that cannot be carried out (the message names the argument and its value)."""


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_detector` wrote: ``out`` (the folder), ``metadata`` (the contents of
    ``lit_jax_export.json``), ``seconds`` (export wall time, weights loading excluded) and ``size_bytes`` (all
    files under ``out``)."""
    format: str
    out: str
    metadata: dict
    seconds: float
    size_bytes: int


def parse_canvas(canvas: Union[str, Sequence[int]], size_divisor: int = 32) -> tuple[int, int]:
    """``'HxW'`` or ``(H, W)`` -> ``(H, W)``; ExportError unless both are positive multiples of ``size_divisor``."""
    try:
        if isinstance(canvas, str):
            h, w = (int(v) for v in canvas.lower().split("x"))
        else:
            h, w = (int(v) for v in canvas)
    except ValueError:
        raise ExportError(f"canvas {canvas!r} is not HxW (for example 800x1344)") from None
    if h <= 0 or w <= 0 or h % size_divisor or w % size_divisor:
        raise ExportError(f"canvas {h}x{w} (HxW): both sides must be positive multiples of {size_divisor}")
    return h, w


def check_request(fmt: str, dtype: str, batch: int, out: str, overwrite: bool = False) -> None:
    """ExportError for an unknown format or dtype, a batch < 1, or an ``out`` that is a file or a non-empty
    folder (unless ``overwrite``). Cheap: runs before any weights are read."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is unknown; known: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is unknown; known: {', '.join(DTYPES)}")
    if int(batch) < 1:
        raise ExportError(f"batch {batch} must be >= 1")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"out {out} is not empty; choose another folder or pass overwrite=True (--overwrite)")


def export_detector(config: Union[str, Any], weights: str, format: str, out: str, *,  # noqa: A002
                    canvas: Optional[Union[str, Sequence[int]]] = None, batch: int = 1, dtype: str = "float32",
                    overrides: Sequence[str] = (), platforms: Optional[Sequence[str]] = None,
                    overwrite: bool = False, config_name: Optional[str] = None) -> ExportResult:
    """Writes ``format`` (``'saved_model'`` | ``'stablehlo'``) of the detector ``config`` + ``weights`` into
    ``out``.

    config / weights / overrides: as :func:`lit_jax.inference.load_detector` (weights that do not fit raise its
    WeightsError). canvas: ``'HxW'`` or ``(H, W)``, multiples of 32; default the config's first training canvas
    (landscape). batch: images per call. dtype: the compute precision (``'bfloat16'`` runs the model in bf16;
    weights and outputs stay float32). platforms: lowering platforms (default: this machine's, e.g. ``('cpu',)``;
    ``('cpu', 'cuda')`` gives one artefact for both). config_name: what the metadata records as the config
    (default: its path). Raises ExportError (see :func:`check_request`)."""
    import copy

    from lit_jax.config import load_config, split_overrides
    from lit_jax.inference import load_detector

    out = os.path.abspath(os.fspath(out))
    check_request(format, dtype, batch, out, overwrite)
    if canvas is not None:
        canvas = parse_canvas(canvas)
    if isinstance(config, (str, os.PathLike)):
        config_name = os.fspath(config)
        _, parsed = split_overrides(list(overrides))
        config = load_config(config_name, parsed)
    else:
        config_name = config_name or "<ConfigDict>"
        config = copy.deepcopy(config)
    with config.unlocked():
        config.model.dtype = dtype
    det = load_detector(config, weights)
    canvas = canvas if canvas is not None else parse_canvas(det.canvases[0], det.size_divisor)
    if canvas[0] % det.size_divisor or canvas[1] % det.size_divisor:
        raise ExportError(f"canvas {canvas[0]}x{canvas[1]}: not a multiple of data.size_divisor={det.size_divisor}")

    import jax

    from lit_jax.export.serving import serving_fn

    platforms = tuple(platforms) if platforms else (jax.default_backend(),)
    serve = serving_fn(det.model, det.mean, det.std)
    b, (h, w) = int(batch), canvas
    inputs = {"images": ((b, h, w, 3), "uint8"), "img_shape": ((b, 2), "int32"),
              "scale_factor": ((b, 4), "float32")}
    specs = [jax.ShapeDtypeStruct(s, d) for s, d in inputs.values()]
    shapes = jax.eval_shape(serve, det.variables, *specs)
    metadata = {
        "format": format, "config": config_name, "weights": os.path.abspath(os.fspath(weights)),
        "detector": config.model.get("type", "retinanet"), "with_masks": bool(det.model.with_masks),
        "canvas": [h, w], "batch": b, "dtype": dtype, "platforms": list(platforms),
        "img_scale": list(det.img_scale), "size_divisor": det.size_divisor, "mean": list(det.mean),
        "std": list(det.std), "class_names": det.class_names, "category_ids": det.category_ids,
        "inputs": [{"name": k, "shape": list(s), "dtype": d} for k, (s, d) in inputs.items()],
        "outputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in shapes.items()],
        "jax_version": jax.__version__,
    }
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    if format == "saved_model":
        from lit_jax.export.saved_model import write_saved_model

        write_saved_model(serve, det.variables, specs, out, metadata, platforms)
    else:
        from lit_jax.export.stablehlo import write_stablehlo

        write_stablehlo(serve, det.variables, specs, out, metadata, platforms)
    seconds = time.perf_counter() - start
    return ExportResult(format, out, metadata, seconds, folder_size(out))


def write_side_files(folder: str, metadata: dict) -> list:
    """``class_names.txt`` (one name a line, label order) and ``lit_jax_export.json`` under ``folder``."""
    os.makedirs(folder, exist_ok=True)
    names = os.path.join(folder, CLASS_NAMES)
    with open(names, "w") as f:
        f.write("".join(f"{n}\n" for n in metadata["class_names"]))
    meta = os.path.join(folder, METADATA)
    with open(meta, "w") as f:
        json.dump(metadata, f, indent=2)
    return [names, meta]


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


__all__ = ["DTYPES", "ExportError", "ExportResult", "FORMATS", "export_detector", "parse_canvas"]
