"""Performance measurement of the LIT models; ``scripts/benchmark.py`` is its command line.

Modules, one job each (read them in this order):
  harness           the benchmark modes end to end: what scripts/benchmark.py runs for its flags
  setups            what a mode times on synthetic inputs: the backbone forward, predict, the train step
  timing            alternating timed rounds, summaries, compile time, :class:`CompileWatch`
  costs             FLOPs from XLA's cost analysis (the unchunked twin), peak memory, host RSS
  records           the environment, one JSON record per measurement, the JSONL file, the printed line
  inference_stages  ``detector.predict`` split into separately jitted stages; image bytes -> model input
  train_stages      the Mask R-CNN loss + gradient split into separately compiled parts, timed against the whole
  torch_reference   the PyTorch reference on the same input and weights (``--compare-torch``; torch and
                    ``third_party`` are imported only inside its functions)

Importing this package imports neither torch nor tensorflow, tensorflow_datasets or pycocotools.
"""
from lit_jax.benchmarking.inference_stages import StagedInference, preprocess_bytes, staged_inference
from lit_jax.benchmarking.timing import CompileWatch, time_rounds
from lit_jax.benchmarking.train_stages import (StagedTrain, TrainPart, compare_composed, format_train_breakdown,
                                               part_runner, staged_train, train_breakdown)

__all__ = ["preprocess_bytes", "CompileWatch", "StagedInference", "staged_inference", "TrainPart", "StagedTrain",
           "staged_train", "time_rounds", "part_runner", "compare_composed", "train_breakdown",
           "format_train_breakdown"]
