"""What the three rerankers share: the base class (``score`` API, length-aware batching),
chunking, and reading / writing their settings.

Every reranker turns (query, document) pairs into *units*: one token sequence per document
chunk (cross-encoder, LLM) or one (query, chunk) sequence pair (ColBERT).  A short document is
one unit; a long one, with ``max_chunks > 1``, is split into overlapping token windows and its
score is the max over its chunks (MaxP, Dai & Callan 2019).  Units are sorted by length and
batched so a forward pass pads little, then scores go back to input order.

The registry of the three (kind -> class, :func:`~distributed_ir.models.rerankers.load_reranker`)
lives in :mod:`distributed_ir.models.rerankers`, so this base never imports its subclasses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch

from distributed_ir.models.settings import SETTINGS_FILE, RerankerSettings


def write_settings(path: Path, kind: str, settings: RerankerSettings, extra: dict[str, Any] | None = None) -> None:
    """``distributed_ir.json``: ``{"reranker": {"kind", settings...}, "versions", **extra}``."""
    import transformers

    from distributed_ir import __version__

    versions = {"distributed_ir": __version__, "pytorch": torch.__version__, "transformers": transformers.__version__}
    obj = {"reranker": {"kind": kind, **asdict(RerankerSettings.of(settings))}, "versions": versions, **(extra or {})}
    (Path(path) / SETTINGS_FILE).write_text(json.dumps(obj, indent=2) + "\n")


def read_settings(path: str | Path) -> tuple[str, RerankerSettings] | None:
    """``(kind, settings)`` saved in ``path``, or None for a plain Hugging Face folder."""
    file = Path(path) / SETTINGS_FILE
    if not file.is_file():
        return None
    saved = json.loads(file.read_text()).get("reranker")
    if not isinstance(saved, dict) or "kind" not in saved:
        raise ValueError(f"{file}: not a reranker checkpoint (no 'reranker' section with a 'kind'; an embedder?)")
    known = {f.name for f in fields(RerankerSettings)}
    return saved["kind"], RerankerSettings(**{k: v for k, v in saved.items() if k in known})


def window_starts(length: int, size: int, overlap: int, max_chunks: int) -> list[int]:
    """Start offsets of up to ``max_chunks`` windows of ``size`` tokens, consecutive ones sharing
    ``overlap`` tokens, covering ``length`` tokens (the first window starts at 0)."""
    if length <= size or max_chunks == 1:
        return [0]
    step = max(1, size - min(overlap, size - 1))
    starts = list(range(0, length - size + step, step))[:max_chunks]
    return [s for s in starts if s < length]


def chunk_ids(ids: list[int], size: int, overlap: int, max_chunks: int) -> list[list[int]]:
    """Overlapping windows of a token id list (one window = truncation when max_chunks is 1)."""
    return [ids[s:s + size] for s in window_starts(len(ids), size, overlap, max_chunks)]


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class RerankerBase(torch.nn.Module):
    """Shared inference: ``score`` / ``score_pairs`` over units built by the subclass.

    Subclasses implement ``build_units(queries, documents) -> (units, owners)`` where each unit
    is a dict of token id lists and ``owners[i]`` is the pair it belongs to, plus
    ``score_units(units, device) -> Tensor[n]``.
    """

    kind: ClassVar[str]
    settings: RerankerSettings

    @classmethod
    def from_pretrained(cls, name_or_path: str, settings: RerankerSettings | None = None,
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                        **overrides: Any) -> Self:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> Self:
        """A reranker saved by :meth:`save` (its settings apply; ``overrides`` change them)."""
        return cls.from_pretrained(str(path), **overrides)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def build_units(self, queries: Sequence[str], documents: Sequence[str]) -> tuple[list[dict], list[int]]:
        raise NotImplementedError

    def score_units(self, units: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def scoring_backbone(self) -> torch.nn.Module:
        """The transformer ``score_units`` calls (what :meth:`compile_backbone` compiles)."""
        return self.model

    def compile_backbone(self) -> None:
        """``torch.compile`` the transformer in place for inference (``dynamic=True``: one graph for
        every batch and sequence length; ``state_dict`` keys unchanged).  The first batches pay the
        compile (tens of seconds on CPU; inductor's on-disk cache makes later processes faster)."""
        from distributed_ir.models.precision import compile_in_place

        compile_in_place(self.scoring_backbone(), dynamic=True)  # a bf16w copy compiles the same way

    @staticmethod
    def unit_length(unit: dict) -> int:
        return sum(len(v) for k, v in unit.items() if k.endswith("input_ids"))

    @torch.inference_mode()
    def score_pairs(self, queries: Sequence[str], documents: Sequence[str], batch_size: int = 32,
                    dtype: torch.dtype | None = None) -> np.ndarray:
        """float32 scores, one per (query, document) pair, in input order (max over chunks)."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries for {len(documents)} documents")
        out = np.full(len(queries), -np.inf, dtype=np.float32)
        if not len(queries):
            return out
        was_training = self.training
        self.eval()
        try:
            self.fill_scores(list(queries), list(documents), out, batch_size, dtype)
        finally:
            self.train(was_training)
        return out

    def fill_scores(self, queries: list[str], documents: list[str], out: np.ndarray, batch_size: int,
                    dtype: torch.dtype | None) -> None:
        """Write each pair's score into ``out`` (pre-filled with -inf; max over chunks): units in
        length-sorted batches.  A subclass with a cheaper scheme overrides this (ColBERT)."""
        units, owners = self.build_units(queries, documents)
        # Longest first, so memory peaks on the first batch and padding stays small throughout.
        order = np.argsort([-self.unit_length(u) for u in units], kind="stable")
        owners_arr = np.asarray(owners)
        with autocast_for(self.device, dtype):
            for start in range(0, len(units), batch_size):
                idx = order[start:start + batch_size]
                scores = self.score_units([units[i] for i in idx]).float().cpu().numpy()
                np.maximum.at(out, owners_arr[idx], scores)

    def score(self, query: str, documents: list[str]) -> list[float]:
        """Scores of ``documents`` for one ``query`` (higher = more relevant)."""
        return self.score_pairs([query] * len(documents), documents).tolist()


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into ``(input_ids, attention_mask)`` tensors on the given side."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    return ids, mask


def load_hf(auto_cls: Any, name_or_path: str, settings: RerankerSettings | None,
            dtype: torch.dtype | None, trust_remote_code: bool, overrides: dict[str, Any],
            **model_kwargs: Any) -> tuple[str, RerankerSettings, Any, torch.nn.Module]:
    """What every reranker's ``from_pretrained`` starts with: ``(path, settings, tokenizer, model)``.

    The path is resolved offline (``HF_HUB_OFFLINE=1`` unless set); the settings are the given
    ones (only the :class:`RerankerSettings` fields of an app config that extends them), else those
    saved in the folder, else the defaults, with ``overrides`` applied; the model is
    ``auto_cls.from_pretrained(path, **model_kwargs)`` in ``dtype``.
    """
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distributed_ir.models.embedder import resolve_model_path

    path = resolve_model_path(name_or_path)
    if settings is None:
        saved = read_settings(path)
        settings = saved[1] if saved else RerankerSettings()
    settings = replace(RerankerSettings.of(settings), **overrides)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {**model_kwargs, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = auto_cls.from_pretrained(path, **kwargs)
    return path, settings, tokenizer, model
