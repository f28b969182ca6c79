"""Inference precision chosen by measurement on the host: ``auto`` | ``fp32`` | ``bf16`` | ``bf16w`` |
``fp16`` | ``int8`` | ``openvino``.

CPUs differ (DESIGN.md): bf16 autocast is 2.45x fp32 on a Xeon with AMX, 1.77x on an AMD EPYC
with avx512_bf16 and 0.70x (slower) on a Xeon with avx512_bf16 but no AMX, where ONNX Runtime
int8 gave 1.33x.  So ``auto`` does not guess from CPU flags; on first use per host and model it

1. runs every candidate on a calibration batch of real inputs (the first texts the stage sees):
   CPU: fp32, bf16 autocast, bf16w (a copy of the model with bfloat16 weights, no autocast: no
   per-layer casts; 2.88x fp32 against autocast's 2.60x on a 2-core AMX Xeon) and int8 (ONNX
   Runtime, :mod:`distributed_ir.models.onnx_int8`) and openvino (the fp32 ONNX export compiled by
   OpenVINO, which runs bfloat16 on AMX CPUs: :mod:`distributed_ir.models.openvino_body`); GPU: fp32, fp16 autocast and, where the GPU
   has bfloat16, bf16 autocast and bf16w.  One untimed warm-up each (it builds the int8 export
   or the bf16w copy), then ``rounds`` timed rounds in alternating order; a variant's time is
   its median;
2. gates quality: each variant's outputs against fp32's (embedders: the smallest cosine over the
   calibration texts; rerankers: the cosine of the mean-centred score vectors, i.e. Pearson's r)
   must reach ``min_cosine``;
3. picks the fastest variant that passes the gate and beats fp32 by ``min_speedup`` (1.05: a
   variant within timing noise of fp32 is not worth its rounding), else fp32 — never slower.

The decision is cached in ``<cache>/<model>-<key>/decisions.json`` under a key of the host (CPU
model and flags, GPU name, torch / ONNX Runtime versions, threads), the model role, batch size,
the gate and the candidate names, written under a file lock: actors that start together measure
once.  A new candidate (bf16w was added after the first caches were written) gives a new key, so
a decision that never measured it is measured again rather than reused; an entry this version
cannot read (unknown fields, an unknown variant) is measured again too.  Explicit
``fp32 | bf16 | bf16w | fp16 | int8 | openvino`` force a choice and measure nothing.

Whatever runs, outputs are float32: pooling accumulates in float32
(:func:`distributed_ir.models.pooling.pool`), normalisation, scores and ColBERT's MaxSim are
computed in float32, as under autocast.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distributed_ir.models.onnx_int8 import cpu_flags, file_lock, folder_key

PRECISIONS = ("auto", "fp32", "bf16", "bf16w", "fp16", "int8", "openvino")
# the autocast dtype of each variant (None: none); bf16w, int8 and openvino run a copy of the model instead
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "bf16w": None, "fp16": torch.float16,
                                         "int8": None, "openvino": None}
COPIES = ("int8", "bf16w", "openvino")  # variants that run a copy of the model (the fp32 one is then freed)
CACHE_ENV = "DIR_PRECISION_CACHE"
DECISIONS_FILE = "decisions.json"


@dataclass
class PrecisionPolicy:
    """How a stage picks its precision (``precision`` alone is enough; the rest tunes ``auto``)."""

    precision: str = "auto"
    min_cosine: float = 0.99  # quality gate against fp32 on the calibration batch
    min_speedup: float = 1.05  # a variant must beat fp32 by this factor to be chosen
    cache_dir: str = ""  # '' = $DIR_PRECISION_CACHE, else ~/.cache/distributed-ir/precision
    calibration_texts: int = 32  # first texts (or pairs) the stage sees, used to measure
    rounds: int = 3  # timed rounds per variant (after one warm-up)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine={self.min_cosine}: expected a value in (0, 1]")
        if self.min_speedup < 1.0:
            raise ValueError(f"min_speedup={self.min_speedup}: below 1 would allow a variant slower than fp32")
        if self.calibration_texts < 1 or self.rounds < 1:
            raise ValueError("calibration_texts and rounds must be >= 1")

    @classmethod
    def of(cls, precision: str | PrecisionPolicy) -> PrecisionPolicy:
        return precision if isinstance(precision, PrecisionPolicy) else cls(precision=precision)


@dataclass
class Decision:
    """What a stage runs, and why: median seconds per calibration batch, quality vs fp32, and
    the reason each other candidate was not taken."""

    chosen: str
    requested: str
    seconds: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    min_cosine: float = 0.99
    min_speedup: float = 1.05
    calibration_texts: int = 0
    key: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def speedups(self) -> dict[str, float]:
        base = self.seconds.get("fp32")
        return {k: round(base / v, 3) for k, v in self.seconds.items() if base and v > 0}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup_vs_fp32": self.speedups()}

    def summary(self) -> str:
        if not self.seconds:
            return f"precision {self.chosen} (requested)"
        parts = [f"{k} {self.seconds[k] * 1e3:.0f} ms x{self.speedups().get(k, 0):.2f} q={self.quality.get(k, 0):.4f}"
                 for k in self.seconds]
        why = "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        return (f"precision auto -> {self.chosen}{' (cached)' if self.cached else ''} on "
                f"{self.calibration_texts} texts [{', '.join(parts)}]" + (f"; not chosen: {why}" if why else ""))


def choose_precision(seconds: dict[str, float], quality: dict[str, float], min_cosine: float = 0.99,
                     min_speedup: float = 1.05, unavailable: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """The fastest variant that passes the quality gate and beats fp32 by ``min_speedup``, else fp32.

    ``seconds``: measured time per variant (must include ``fp32``); ``quality``: its agreement with
    fp32 (cosine); ``unavailable``: variants that could not run, with the reason.  Returns
    ``(chosen, {variant: why it was not chosen})``.  The chosen time is never above fp32's."""
    if "fp32" not in seconds:
        raise ValueError("fp32 must be measured: it is the baseline every variant is compared with")
    rejected = dict(unavailable or {})
    base = seconds["fp32"]
    passing = {}
    for name, sec in seconds.items():
        if name == "fp32":
            continue
        q = quality.get(name, float("nan"))
        if not q >= min_cosine:  # NaN fails too
            rejected[name] = f"failed the quality gate: cosine to fp32 {q:.4f} < {min_cosine}"
        elif not sec * min_speedup <= base:
            rejected[name] = f"not faster than fp32 by {min_speedup}x ({base / sec:.2f}x)"
        else:
            passing[name] = sec
    chosen = min(passing, key=passing.get) if passing else "fp32"
    for name, sec in passing.items():
        if name != chosen:
            rejected[name] = f"slower than {chosen} ({base / sec:.2f}x vs {base / passing[chosen]:.2f}x)"
    return chosen, rejected


def min_row_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """The smallest cosine between matching rows (embedders: each text's vector vs fp32's)."""
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    num = (ref * out).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    return float(np.min(num / np.maximum(den, 1e-12)))


def score_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Cosine of the mean-centred score vectors (Pearson's r): rerankers' scores vs fp32's."""
    a, b = ref.astype(np.float64) - ref.mean(), out.astype(np.float64) - out.mean()
    if np.linalg.norm(a) < 1e-12:  # constant scores: agreement means equal scores
        return 1.0 if np.allclose(ref, out, atol=1e-3) else 0.0
    return float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def measure(runs: dict[str, Callable[[], np.ndarray]], rounds: int = 3, give_up: float = 2.0,
            clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, float], dict[str, np.ndarray],
                                                                     dict[str, str]]:
    """Median seconds of each run over ``rounds`` alternating rounds, after one untimed warm-up.

    Returns ``(seconds, outputs, unavailable)``: a run that raises is unavailable (with the error);
    one ``give_up`` times slower than fp32 in the first round is not timed again."""
    outputs, unavailable = {}, {}
    for name, run in runs.items():
        try:
            outputs[name] = run()
        except Exception as e:  # noqa: BLE001 - any failure makes the variant unavailable, not the stage
            if name == "fp32":
                raise
            unavailable[name] = f"unavailable: {type(e).__name__}: {e}"[:300]
    times: dict[str, list[float]] = {name: [] for name in outputs}
    for r in range(rounds):
        names = list(times) if r % 2 == 0 else list(times)[::-1]
        for name in names:
            if r and times[name][0] > give_up * times["fp32"][0]:
                continue
            t0 = clock()
            runs[name]()
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, outputs, unavailable


def candidates(device: torch.device, int8_missing: str | None,
               bf16w_missing: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Variants worth measuring on ``device``, and those left out with the reason
    (``int8_missing`` / ``bf16w_missing``: why this model has no such variant, None when it has one)."""
    if device.type == "cuda":
        names, skipped = ["fp32", "fp16"], {"int8": "int8 runs on CPU (ONNX Runtime)", "openvino": "openvino runs on CPU"}
        if not torch.cuda.is_bf16_supported():
            skipped["bf16"] = skipped["bf16w"] = "this GPU has no bfloat16"
        else:
            names.append("bf16")
            if bf16w_missing:
                skipped["bf16w"] = bf16w_missing
            else:
                names.append("bf16w")
        return names, skipped
    names, skipped = ["fp32", "bf16"], {"fp16": "fp16 autocast needs a GPU"}
    if bf16w_missing:
        skipped["bf16w"] = bf16w_missing
    else:
        names.append("bf16w")
    if int8_missing:
        skipped["int8"] = int8_missing
    else:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            skipped["int8"] = "onnxruntime is not installed (pip install 'distributed-ir[cpu]')"
        else:
            names.append("int8")
    from distributed_ir.models.openvino_body import openvino_missing

    why = int8_missing or openvino_missing()
    if why:
        skipped["openvino"] = why
    else:
        names.append("openvino")
    return names, skipped


def check_forced(precision: str, device: torch.device, int8_missing: str | None,
                 bf16w_missing: str | None = None) -> None:
    """Refuse an explicit precision the device or model cannot run."""
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a GPU; use bf16, bf16w, int8 or fp32 on CPU")
    if precision in ("bf16", "bf16w") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{precision}: this GPU has no bfloat16; use fp16 or fp32")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("int8 runs on CPU (ONNX Runtime); on a GPU use fp16 or bf16")
    if precision == "int8" and int8_missing:
        raise ValueError(f"int8: {int8_missing}")
    if precision == "openvino":
        from distributed_ir.models.openvino_body import openvino_missing

        if device.type != "cpu":
            raise ValueError("openvino runs on CPU; on a GPU use fp16 or bf16")
        why = int8_missing or openvino_missing()
        if why:
            raise ValueError(f"openvino: {why}")
    if precision == "bf16w" and bf16w_missing:
        raise ValueError(f"bf16w: {bf16w_missing}; use fp32 (the model runs in its own dtype) or bf16")


def int8_missing(model: torch.nn.Module) -> str | None:
    """Why ``model`` has no int8 variant (None: it has one)."""
    if getattr(model, "onnx_body", None) is None:
        return "not offered for this model kind (embedders, cross-encoders and ColBERT only)"
    if sum(p.numel() for p in model.parameters()) * 4 >= 2 ** 31:
        return "the fp32 ONNX export would exceed protobuf's 2 GB limit"
    return None


def bf16w_missing(model: torch.nn.Module) -> str | None:
    """Why ``model`` has no bf16w variant (None: it has one): no float32 weights to cast."""
    if not any(p.dtype == torch.float32 for p in model.parameters()):
        return "the model has no float32 weights to cast to bfloat16"
    return None


COMPILE_ARGS = "_dir_compile_kwargs"  # what compile_in_place passed to Module.compile (kept by deepcopy)


def compile_in_place(module: torch.nn.Module, **kwargs: Any) -> None:
    """``module.compile(**kwargs)``, remembering ``kwargs`` so a copy of the module (:func:`bf16_copy`)
    can be compiled the same way: ``copy.deepcopy`` drops a module's compiled call."""
    module.compile(**kwargs)
    setattr(module, COMPILE_ARGS, dict(kwargs))


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its floating-point weights and buffers in bfloat16; ``model`` itself
    is untouched (its fp32 weights stay what fp32, autocast and the int8 export run).

    Built tensor by tensor: each floating parameter and buffer is cast straight into a new bfloat16
    tensor, so no float32 copy of the model is ever made (the extra memory is half the fp32
    weights).  A submodule compiled in place (``Module.compile``, e.g.
    :meth:`RerankerBase.compile_backbone`) is compiled again in the copy, with the arguments
    :func:`compile_in_place` recorded (none known: ``torch.compile``'s defaults)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in memo:
            data = t.detach().to(torch.bfloat16, copy=True)
            memo[id(t)] = torch.nn.Parameter(data, t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
    out = copy.deepcopy(model, memo)
    for name, module in model.named_modules():
        if module.__dict__.get("_compiled_call_impl") is not None:  # dropped by Module.__getstate__
            out.get_submodule(name).compile(**getattr(module, COMPILE_ARGS, {}))
    return out


def cache_root(cache_dir: str = "") -> Path:
    """``cache_dir``, else ``$DIR_PRECISION_CACHE``, else ``$XDG_CACHE_HOME`` (~/.cache)/distributed-ir/precision."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distributed-ir" / "precision"


def host_key(device: torch.device) -> dict[str, Any]:
    """What the timings depend on besides the model: CPU (name and flags), GPU, versions, threads."""
    cpu = platform.processor()
    try:
        cpu = next((ln.partition(":")[2].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    return {"cpu": cpu, "cpu_flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12],
            "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "onnxruntime": ort_version, "openvino": ov_version}


def model_cache_dir(model_dir: str | Path, policy: PrecisionPolicy) -> Path:
    return cache_root(policy.cache_dir) / f"{Path(model_dir).resolve().name or 'model'}-{folder_key(model_dir)}"


def decide(model_dir: str | Path, role: dict[str, Any], device: torch.device, policy: PrecisionPolicy,
           runs: dict[str, Callable[[], np.ndarray]], quality: Callable[[np.ndarray, np.ndarray], float],
           skipped: dict[str, str]) -> Decision:
    """``auto``: the cached decision for this host, model and role, else measure ``runs`` and decide.

    ``runs`` map each candidate to a zero-argument call that processes the calibration batch with
    it and returns the outputs (fp32 first); ``skipped`` lists candidates not measured, with why."""
    key, key_id = decision_key(device, role, policy, list(runs))
    folder = model_cache_dir(model_dir, policy)
    try:
        with file_lock(folder / "decisions.lock"):
            saved = _read_json(folder / DECISIONS_FILE)
            decision = cached_decision(saved.get(key_id), list(runs))
            if decision is None:
                decision = _measure_and_choose(runs, quality, skipped, policy, key)
                saved[key_id] = {k: v for k, v in asdict(decision).items() if k != "cached"}
                _write_json_atomic(folder / DECISIONS_FILE, saved)
    except OSError as e:  # a read-only cache: measure anyway (int8 then reports its own export error)
        print(f"[precision] cache {folder} not writable ({e}); measuring without caching", file=sys.stderr,
              flush=True)
        decision = _measure_and_choose(runs, quality, skipped, policy, key)
    print(f"[precision] {role.get('role', '')} {decision.summary()}", file=sys.stderr, flush=True)
    return decision


def decision_key(device: torch.device, role: dict[str, Any], policy: PrecisionPolicy,
                 names: list[str]) -> tuple[dict[str, Any], str]:
    """What a cached decision depends on, and its id in ``decisions.json``: the host, the role, the
    gate and the candidate names (a candidate added in a later version makes a new key)."""
    key = {**host_key(device), **role, "min_cosine": policy.min_cosine, "min_speedup": policy.min_speedup,
           "candidates": sorted(names)}
    return key, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cached_decision(entry: Any, names: list[str]) -> Decision | None:
    """A saved decision, or None when there is none or this version cannot use it (not a
    Decision's fields, or a chosen variant that is not among ``names``): then it is measured again."""
    known = {f.name for f in fields(Decision)} - {"cached"}
    if not isinstance(entry, dict) or not set(entry) <= known | {"cached"} or entry.get("chosen") not in names:
        return None
    try:
        return Decision(**{**{k: v for k, v in entry.items() if k in known}, "cached": True})
    except TypeError:  # a required field missing
        return None


def _measure_and_choose(runs: dict[str, Callable[[], np.ndarray]], quality: Callable[[np.ndarray, np.ndarray], float],
                        skipped: dict[str, str], policy: PrecisionPolicy, key: dict[str, Any]) -> Decision:
    seconds, outputs, unavailable = measure(runs, policy.rounds)
    scores = {k: 1.0 if k == "fp32" else quality(outputs["fp32"], v) for k, v in outputs.items()}
    chosen, rejected = choose_precision(seconds, scores, policy.min_cosine, policy.min_speedup,
                                        {**skipped, **unavailable})
    return Decision(chosen=chosen, requested="auto", seconds={k: round(v, 5) for k, v in seconds.items()},
                    quality={k: round(v, 6) for k, v in scores.items()}, rejected=rejected,
                    min_cosine=policy.min_cosine, min_speedup=policy.min_speedup,
                    calibration_texts=len(next(iter(outputs.values()))), key=key)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class PrecisionChoice:
    """A stage's model in its precision: run ``model`` under ``autocast(dtype)`` (None = none).

    Explicit precisions apply at once; ``auto`` waits for :meth:`calibrate` with the stage's first
    inputs.  int8 swaps in a copy of the model whose body runs in ONNX Runtime, bf16w a copy with
    bfloat16 weights; the model passed in is never changed, and once either copy is applied this
    object drops its reference to it (the stage owns its model: the fp32 weights are then freed
    unless the caller keeps them)."""

    def __init__(self, model: torch.nn.Module, model_dir: str | Path, device: torch.device,
                 policy: PrecisionPolicy, role: dict[str, Any]):
        self.base: torch.nn.Module | None = model
        self.model, self.dtype = model, None
        self.model_dir, self.device, self.policy, self.role = model_dir, device, policy, role
        self.int8_missing = int8_missing(model)
        self.bf16w_missing = bf16w_missing(model)
        self._copies: dict[str, torch.nn.Module] = {}  # int8 / bf16w / openvino copies built so far
        self.decision: Decision | None = None
        self._reported = False
        if policy.precision != "auto":
            check_forced(policy.precision, device, self.int8_missing, self.bf16w_missing)
            self.apply(policy.precision)
            self.decision = Decision(chosen=policy.precision, requested=policy.precision,
                                     min_cosine=policy.min_cosine, min_speedup=policy.min_speedup)

    @property
    def pending(self) -> bool:
        """``auto`` before its calibration batch."""
        return self.decision is None

    def variant(self, name: str) -> tuple[torch.nn.Module, torch.dtype | None]:
        if name in self._copies:
            return self._copies[name], None
        if self.base is None:
            raise RuntimeError(f"the fp32 model was released when {self.model_dir} chose a copy ({', '.join(COPIES)})")
        if name == "int8":
            from distributed_ir.models.onnx_int8 import int8_model

            self._copies[name] = int8_model(self.base, self.model_dir, cache_root(self.policy.cache_dir))
        elif name == "openvino":
            from distributed_ir.models.openvino_body import openvino_model

            self._copies[name] = openvino_model(self.base, self.model_dir, cache_root(self.policy.cache_dir))
        elif name == "bf16w":
            self._copies[name] = bf16_copy(self.base)
        else:
            return self.base, DTYPES[name]
        return self._copies[name], None

    def apply(self, name: str) -> None:
        self.model, self.dtype = self.variant(name)
        if name in COPIES:
            self.base = None  # the copy (ONNX / OpenVINO session, bfloat16 weights) holds its own weights
        # measured, not chosen: free them
        self._copies = {k: v for k, v in self._copies.items() if k == name}

    def calibrate(self, run: Callable[[torch.nn.Module, torch.dtype | None], np.ndarray],
                  quality: Callable[[np.ndarray, np.ndarray], float]) -> Decision:
        """Measure the candidates with ``run(model, dtype)`` on the calibration batch (or take the
        cached decision), then apply the winner."""
        names, skipped = candidates(self.device, self.int8_missing, self.bf16w_missing)
        runs = {n: (lambda n=n: run(*self.variant(n))) for n in names}
        self.decision = decide(self.model_dir, self.role, self.device, self.policy, runs, quality, skipped)
        self.apply(self.decision.chosen)
        return self.decision

    def report_column(self, rows: int) -> np.ndarray:
        """A ``precision_decision`` column for the driver: the decision's JSON on the first row this
        model returns, ``""`` everywhere else (actors tell the driver what ran without a side channel)."""
        col = np.full(rows, "", dtype=object)
        if rows and not self._reported:
            col[0] = json.dumps(self.decision.to_dict() if self.decision else {}, sort_keys=True)
            self._reported = True
        return col


def collect_decisions(column: Any) -> list[dict[str, Any]]:
    """The decisions found in a ``precision_decision`` column (empty rows skipped)."""
    return [json.loads(s) for s in column if isinstance(s, str) and s]


def summarize_decisions(requested: str, decisions: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run records (manifest, metrics): the request, the variant(s) that ran, and each
    distinct decision with its timings (actors of one host share one)."""
    unique: dict[str, dict[str, Any]] = {}
    for d in decisions:
        unique.setdefault(json.dumps({k: v for k, v in d.items() if k != "cached"}, sort_keys=True), d)
    return {"requested": requested, "chosen": sorted({d["chosen"] for d in decisions}),
            "decisions": list(unique.values())}


def flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys for a command's one-object JSON output (scripts parse it flat): the variant(s)
    that ran and, for ``auto``, the measured speed-up of the chosen one over fp32."""
    speedups = [d["speedup_vs_fp32"][d["chosen"]] for d in summary["decisions"]
                if d.get("speedup_vs_fp32", {}).get(d["chosen"])]
    return {"precision": ",".join(summary["chosen"]) or summary["requested"],
            "precision_requested": summary["requested"],
            "precision_speedup_vs_fp32": min(speedups) if speedups else None}
