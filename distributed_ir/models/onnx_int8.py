"""int8 on CPU: a model's transformer body exported to ONNX and dynamically quantised, run by ONNX Runtime.

Only the body runs in ONNX Runtime (``last_hidden_state`` of an encoder, ``logits`` of a
cross-encoder); tokenisation, instructions, EOS, pooling, normalisation and scoring stay the
model's own Python code, so they are exactly the torch path's.  The export uses the ecosystem's
tools: ``torch.onnx.export`` for the graph and ``onnxruntime.quantization.quantize_dynamic`` with
the settings of optimum's ``AutoQuantizationConfig`` for this CPU's instruction set (VNNI /
AVX-512 / ARM: signed int8 weights; AVX2 only: unsigned), per-channel symmetric weights.

Exports are cached once per model folder under the precision cache (see
:func:`distributed_ir.models.precision.cache_root`), keyed by the folder's files (names, sizes,
mtimes) and the torch / ONNX Runtime versions.  Several actors starting at once are safe: one
builds under a file lock into a temporary folder, renamed into place when complete; the others
wait on the lock and load the finished export.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

MODEL_FILE = "model.onnx"
META_FILE = "export.json"
# Two texts of different lengths: the example batch must hold padding, or the traced graph could
# keep a "no padding" shortcut of the attention-mask code.
EXAMPLE_TEXTS = ("a much longer example text, long enough to need padding beside the short one " * 3, "short")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing); the OS releases it if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def folder_key(model_dir: str | Path) -> str:
    """Cheap identity of a model folder: every file's relative name, size and mtime (no hashing of
    gigabytes of weights in every actor); a changed or replaced file gives a new key."""
    root = Path(model_dir).resolve()
    h = hashlib.sha256(str(root).encode())
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def quant_config(flags: set[str] | None = None) -> dict[str, Any]:
    """optimum's dynamic ``AutoQuantizationConfig`` for this CPU, as ``quantize_dynamic`` arguments.

    avx512_vnni / avx512 / arm64: int8 weights (u8 x s8 kernels); avx2 only: uint8 weights (u8 x u8,
    no VNNI saturation).  All per-channel, symmetric weights, full range."""
    import platform

    flags = cpu_flags() if flags is None else flags
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    if not x86:
        name = "arm64"
    elif {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        name = "avx512_vnni"
    elif "avx512f" in flags:
        name = "avx512"
    else:
        name = "avx2"
    return {"name": name, "weight_type": "QUInt8" if name == "avx2" else "QInt8", "per_channel": True,
            "reduce_range": False}


def export_dir(model_dir: str | Path, role: str, cache_root: Path, quantize: bool = True) -> Path:
    """Where the int8 export (``quantize``) or the fp32 export (OpenVINO's input) of ``model_dir`` for
    ``role`` lives (one folder per model, role, CPU kind and torch/ONNX Runtime versions)."""
    import onnxruntime

    q = quant_config()
    versions = hashlib.sha256(f"{torch.__version__} {onnxruntime.__version__}".encode()).hexdigest()[:8]
    name = Path(model_dir).resolve().name or "model"
    kind = f"int8-{role}-{q['name']}" if quantize else f"fp32-{role}"
    return cache_root / f"{name}-{folder_key(model_dir)}" / f"{kind}-{versions}"


class _Body(nn.Module):
    """``module(**inputs).<output>`` with positional inputs, the form ``torch.onnx.export`` traces."""

    def __init__(self, module: nn.Module, names: list[str], output: str):
        super().__init__()
        self.module, self.names, self.output = module, names, output

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.module(**dict(zip(self.names, args))), self.output)


def export_onnx(module: nn.Module, example: dict[str, torch.Tensor], output: str, path: Path) -> None:
    names = list(example)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch", 1: "sequence"} if output != "logits" else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python branches on shapes
        torch.onnx.export(_Body(module, names, output).eval(), tuple(example[n] for n in names), str(path),
                          input_names=names, output_names=[output], dynamic_axes=axes, opset_version=17,
                          dynamo=False)


def _check_export(module: nn.Module, example: dict[str, torch.Tensor], output: str, path: Path) -> float:
    """The fp32 ONNX graph reproduces torch on the padded example batch; returns the max abs error."""
    import onnxruntime as ort

    with torch.no_grad():
        ref = getattr(module(**example), output).float().numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in example.items()})[0]
    err = float(np.abs(got - ref).max())
    if got.shape != ref.shape or err > 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"ONNX export of {type(module).__name__} differs from torch (max abs error {err:.3g})")
    return err


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = quant_config()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint as a root warning
    try:
        quantize_dynamic(src, dst, weight_type=getattr(QuantType, q["weight_type"]), per_channel=q["per_channel"],
                         reduce_range=q["reduce_range"],
                         extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    finally:
        root.setLevel(level)


def build_int8(module: nn.Module, example: dict[str, torch.Tensor], output: str, model_dir: str | Path,
               role: str, cache_root: Path, quantize: bool = True) -> tuple[Path, bool]:
    """The int8 ONNX model of ``module`` (cached): ``(path to model.onnx, built now?)``; with
    ``quantize=False`` the checked fp32 graph instead (what OpenVINO compiles).

    ``module(**example).<output>`` is what the graph computes; ``example`` is a padded CPU batch."""
    target = export_dir(model_dir, role, cache_root, quantize)
    model_file = target / MODEL_FILE
    if model_file.is_file():
        return model_file, False
    with file_lock(target.with_name(target.name + ".lock")):
        if model_file.is_file():  # another process built it while this one waited
            return model_file, False
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            module = module.eval()
            example = {k: v.cpu() for k, v in example.items()}
            export_onnx(module, example, output, tmp / "fp32.onnx")
            err = _check_export(module, example, output, tmp / "fp32.onnx")
            if quantize:
                _quantize(tmp / "fp32.onnx", tmp / MODEL_FILE)
                (tmp / "fp32.onnx").unlink()  # only the int8 graph is kept
            else:
                os.replace(tmp / "fp32.onnx", tmp / MODEL_FILE)
            import onnxruntime

            meta = {"model": str(Path(model_dir).resolve()), "role": role, "output": output, "inputs": list(example),
                    "quantization": quant_config() if quantize else None, "fp32_export_max_abs_error": err,
                    "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
                    "built_by_pid": os.getpid(), "seconds": round(time.perf_counter() - t0, 2)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, target)  # complete or absent: readers never see a half-written export
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model_file, True


class ExportedBody(nn.Module):
    """A runtime outside torch standing in for a transformer body: ``forward(**inputs)`` returns an
    object whose ``<output>`` attribute is a CPU float32 tensor, as the Hugging Face model did.
    Subclasses set ``self.inputs`` (the graph's input names) and implement :meth:`run`."""

    def __init__(self, config: Any, output: str):
        super().__init__()
        self.config = config  # hidden_size, num_labels: read by the wrapping model
        # callers find a model's device from its first parameter: an empty CPU one answers them
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        self.output = output
        self.inputs: list[str] = []

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def forward(self, **inputs: torch.Tensor | None) -> SimpleNamespace:
        feed = {k: inputs[k].detach().cpu().numpy().astype(np.int64) for k in self.inputs}
        out = np.array(self.run(feed), dtype=np.float32)  # a copy: runtimes may reuse their buffers
        return SimpleNamespace(**{self.output: torch.from_numpy(out)})


class OnnxBody(ExportedBody):
    """An ONNX Runtime session standing in for a transformer body."""

    def __init__(self, path: str | Path, config: Any, output: str, threads: int = 0):
        import onnxruntime as ort

        super().__init__(config, output)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feed)[0]


def exported_copy(model: nn.Module, model_dir: str | Path, cache_root: Path, body_cls: type[ExportedBody],
                  runtime: str, quantize: bool, threads: int = 0, unavailable: str | None = None) -> nn.Module:
    """A copy of ``model`` (embedder, cross-encoder or ColBERT) whose body runs in ``body_cls``, from
    the cached export (int8 when ``quantize``, else fp32). ``unavailable``: why the runtime cannot
    run here (refused once the model itself is known to be exportable).

    The model names its body and output (``onnx_body = (attribute, output)``), gives a padded
    example batch (``onnx_example()``) and rebuilds itself around another body (``with_body``)."""
    spec = getattr(model, "onnx_body", None)
    if spec is None:
        raise ValueError(f"{runtime} is not offered for {type(model).__name__} (encoder models only: embedders, "
                         "cross-encoders, ColBERT)")
    attr, output = spec
    body = getattr(model, attr)
    if next(body.parameters()).device.type != "cpu":
        raise ValueError(f"{runtime} runs on CPU; on a GPU use fp16 or bf16")
    if unavailable:
        raise ValueError(f"{runtime}: {unavailable}")
    path, built = build_int8(body, model.onnx_example(), output, model_dir, type(model).__name__.lower(), cache_root,
                             quantize=quantize)
    if built:
        print(f"[precision] exported {type(model).__name__} to {'int8' if quantize else 'fp32'} ONNX at {path} "
              f"({runtime})", flush=True)
    return model.with_body(body_cls(path, body.config, output, threads))


def int8_model(model: nn.Module, model_dir: str | Path, cache_root: Path, threads: int = 0) -> nn.Module:
    """A copy of ``model`` whose body runs int8 in ONNX Runtime (see :func:`exported_copy`)."""
    return exported_copy(model, model_dir, cache_root, OnnxBody, "int8 (ONNX Runtime)", True, threads)
