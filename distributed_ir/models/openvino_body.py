"""``openvino`` on CPU: a model's transformer body compiled by OpenVINO from its fp32 ONNX export.

OpenVINO's CPU plugin picks its own inference precision for the host: bfloat16 where the CPU has
AMX (its default ``INFERENCE_PRECISION_HINT`` there), float32 elsewhere, with its own fused
attention and layer-norm kernels.  On the 2-core AMX Xeon (BENCHMARKS.md) it encoded 1,500
SciFact documents at 2.37x fp32 against 2.33x for bfloat16 weights in torch (medians of 3; with one
thread per actor bf16w was faster); other CPUs differ, which is why it is one more ``auto``
candidate, measured and gated like the others, never assumed.

As with int8 (:mod:`distributed_ir.models.onnx_int8`), only the body runs outside torch:
tokenisation, instructions, EOS, pooling, normalisation and scoring stay the model's own Python
code.  The fp32 ONNX export (checked against torch) is cached once per model folder and role
beside the int8 export, built under the same file lock; every process compiles it for its own
thread count (seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distributed_ir.models.onnx_int8 import ExportedBody, exported_copy


def openvino_missing() -> str | None:
    """Why this process cannot run OpenVINO (None: it can)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'distributed-ir[cpu]')"
    try:
        import onnxruntime  # noqa: F401  (the export is checked with it)
    except ImportError:
        return "onnxruntime is not installed (pip install 'distributed-ir[cpu]')"
    return None


class OpenVinoBody(ExportedBody):
    """An OpenVINO compiled model standing in for a transformer body."""

    def __init__(self, path: str | Path, config: Any, output: str, threads: int = 0):
        import openvino as ov

        super().__init__(config, output)
        core = ov.Core()
        model = core.read_model(str(path))
        self.inputs = [p.get_any_name() for p in model.inputs]
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                                                          "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.inference_precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return next(iter(self.request.infer(feed).values()))


def openvino_model(model: nn.Module, model_dir: str | Path, cache_root: Path, threads: int = 0) -> nn.Module:
    """A copy of ``model`` (embedder, cross-encoder or ColBERT) whose body runs in OpenVINO, compiled
    from the cached fp32 export (see :func:`~distributed_ir.models.onnx_int8.exported_copy`)."""
    return exported_copy(model, model_dir, cache_root, OpenVinoBody, "openvino", False, threads,
                         unavailable=openvino_missing())
