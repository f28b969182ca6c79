"""EncodeStage: a plain callable class that turns a batch of texts into embeddings.

Ray Data builds one per actor (``__init__`` loads the model once); unit tests and single-GPU
benchmarks call it directly. No Ray imports here.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from distributed_ir import faults
from distributed_ir.config import ModelConfig
from distributed_ir.models.embedder import Embedder, resolve_model_path
from distributed_ir.models.precision import PrecisionChoice, PrecisionPolicy, min_row_cosine


def actor_device(device: str, threads: int = 0) -> torch.device:
    """Set up a model actor: offline hub, ``threads`` torch threads (0 = default), ``auto`` device."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class EncodeStage:
    """``__call__({"doc_id", "text", ...}) -> {"doc_id", ..., "embedding"}``, batched by length inside.

    Args:
        model: saved embedder folder or ``default``; its own saved settings decide pooling,
            instructions, max length and normalisation (``overrides`` may not contradict them).
        kind: ``document`` or ``query`` (selects the instruction template and max length).
        batch_size: texts per forward pass (the Ray batch may be larger; it is split, sorted by
            length so each forward pads little).
        precision: ``auto`` | ``fp32`` | ``bf16`` | ``bf16w`` | ``fp16`` | ``int8``, or a
            :class:`~distributed_ir.models.precision.PrecisionPolicy`.  ``auto`` measures the
            candidates on the first texts the stage sees (cached per host and model).
        device: ``auto`` (first visible GPU, else CPU), ``cpu`` or ``cuda``.
        threads: torch intra-op threads (0 = leave torch's default); ONNX Runtime uses as many.
        report_precision: add a ``precision_decision`` column: the decision (JSON) on the first row
            this stage returns, ``""`` on every other row (how actors tell the driver what ran).
    """

    def __init__(self, model: str, kind: str = "document", batch_size: int = 64,
                 precision: str | PrecisionPolicy = "auto", device: str = "auto", threads: int = 0,
                 overrides: dict | None = None, report_precision: bool = False):
        self.device = actor_device(device, threads)
        model_dir = resolve_model_path(model)
        embedder = Embedder.from_config(ModelConfig(name_or_path=model_dir, **(overrides or {}))).to(self.device)
        embedder.eval()
        self.kind = kind
        self.batch_size = batch_size
        self.policy = PrecisionPolicy.of(precision)
        self.choice = PrecisionChoice(embedder, model_dir, self.device, self.policy,
                                      {"role": f"embedder-{kind}", "batch_size": batch_size})
        self.report_precision = report_precision
        self.calls = 0

    @property
    def embedder(self) -> Embedder:
        """The embedder that runs: the torch model, its bfloat16 copy (bf16w) or its int8 ONNX Runtime copy."""
        return self.choice.model

    @property
    def dtype(self) -> torch.dtype | None:
        return self.choice.dtype

    @property
    def decision(self):
        return self.choice.decision

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def _run(self, embedder: Embedder, dtype: torch.dtype | None, texts: list[str]) -> np.ndarray:
        # the embedder's own loop (length-sorted batches, autocast, inference mode): one encode loop
        return embedder.encode(texts, self.kind, self.batch_size, dtype=dtype)

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]`` in input order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.choice.pending:  # auto: measure on the first texts this stage sees
            sample = texts[:self.policy.calibration_texts]
            self.choice.calibrate(lambda emb, dtype: self._run(emb, dtype, sample), min_row_cosine)
        return self._run(self.embedder, self.dtype, texts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Replace the ``text`` column with ``embedding``; other columns (ids, shard) pass through."""
        self.calls += 1
        faults.before_encode_batch(self.calls)  # opt-in (env) drills, tests only
        out = {k: np.asarray(v) for k, v in batch.items() if k != "text"}
        out["embedding"] = self.encode([str(t) for t in batch["text"]])
        if self.report_precision:
            out["precision_decision"] = self.choice.report_column(len(out["embedding"]))
        return out
