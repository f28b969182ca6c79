"""What a model is configured with and what a saved model folder says about itself: the settings
file name (embedders and rerankers alike), the embedder's :class:`ModelSettings`, the LoRA
adapters' :class:`LoraSettings` and the rerankers' :class:`RerankerSettings`.

Standard library only: the app's config (:mod:`distributed_ir.config`) builds its ``reranker:``
sections on these classes and imports this module, so it must stay light and never import the
config back.  Bad values raise :class:`SettingsError` (a ``ValueError`` naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Self

SETTINGS_FILE = "distributed_ir.json"
DEFAULT_LLM_PROMPT = (
    "Given a query with a relevant body, determine whether the document is pertinent to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text})


class SettingsError(ValueError):
    """A setting is out of range; ``key`` is its dotted name (``model.pooling``)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: expected one of {', '.join(choices)}", key=name)


def check_template(name: str, template: str) -> None:
    """An instruction template must contain exactly one ``{}`` where the text goes."""
    if template.count("{}") != 1:
        raise SettingsError(
            f"{name}={template!r}: an instruction template needs exactly one '{{}}' "
            "marking where the text goes (e.g. 'query: {}')", key=name,
        )


@dataclass
class ModelSettings:
    """Which backbone and how it embeds.

    Fields left at ``None`` are read from the checkpoint (pooling, normalisation, instructions,
    EOS, max lengths saved beside the weights) or fall back to the defaults in
    :class:`distributed_ir.models.embedder.EmbedderSettings`.  Setting pooling, normalize,
    instructions or append_eos to a value that contradicts the checkpoint is an error: the
    #1 cause of "my fine-tuned model got worse" is encoding differently from training.
    """

    name_or_path: str = _help("HF model dir or saved checkpoint; 'default' = bundled all-MiniLM-L6-v2", "default")
    pooling: str | None = _help("cls | mean | last (last real token, any padding side)")
    normalize: bool | None = _help("L2-normalise embeddings")
    query_instruction: str | None = _help("template applied to queries, '{}' = the text")
    document_instruction: str | None = _help("template applied to documents")
    query_max_length: int | None = _help("max tokens for queries")
    document_max_length: int | None = _help("max tokens for documents")
    append_eos: bool | None = _help("append the tokenizer's EOS token (LLM embedders)")
    trust_remote_code: bool = _help("allow model repos to run their own code", False)

    def __post_init__(self) -> None:
        if self.pooling is not None:
            _check_choice("model.pooling", self.pooling, ("cls", "mean", "last"))
        for name in ("query_instruction", "document_instruction"):
            if getattr(self, name) is not None:
                check_template(f"model.{name}", getattr(self, name))
        for name in ("query_max_length", "document_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingsError(f"model.{name} must be >= 1", key=f"model.{name}")


@dataclass
class LoraSettings:
    """Low-rank adapters (peft) on the backbone; only adapter weights train."""

    enabled: bool = _help("train LoRA adapters instead of all weights", False)
    r: int = _help("adapter rank", 16)
    alpha: int = _help("adapter scaling numerator (scale = alpha / r)", 32)
    dropout: float = _help("dropout on the adapter input", 0.05)
    target_modules: list[str] = _help("module names to adapt; ['all-linear'] = every linear layer but the output head",
                                      default_factory=lambda: ["all-linear"])
    export: str = _help("merged (plain model, LoRA folded in) | adapter (adapter files + base path)", "merged")

    def __post_init__(self) -> None:
        _check_choice("lora.export", self.export, ("merged", "adapter"))
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise SettingsError("lora: need r >= 1, alpha >= 1 and 0 <= dropout < 1", key="lora.r")
        if not self.target_modules:
            raise SettingsError("lora.target_modules must name at least one module (or 'all-linear')",
                                key="lora.target_modules")


@dataclass
class RerankerSettings:
    """Saved beside a reranker's weights (``distributed_ir.json``) so scoring always matches training.

    The reranker's kind is not a setting: it is the class (``CrossEncoderReranker.kind``), written
    beside these fields in the file."""

    max_length: int = _help("cross-encoder / LLM: max tokens of the whole (query, document) input", 512)
    query_max_length: int = _help("max query tokens (ColBERT; others cut long queries to this when chunking)", 64)
    document_max_length: int = _help("ColBERT: max document tokens per chunk", 256)
    max_chunks: int = _help("1 = truncate long documents; N > 1 = score up to N overlapping chunks, keep the max", 1)
    chunk_overlap: int = _help("tokens shared by consecutive chunks", 64)
    colbert_dim: int = _help("ColBERT head width (a colbert_linear.pt in the model folder decides instead)", 128)
    prompt: str = _help("LLM reranker instruction, read after the document ('' = the default Yes/No prompt)",
                        DEFAULT_LLM_PROMPT)

    def __post_init__(self) -> None:
        for name in ("max_length", "query_max_length", "document_max_length", "max_chunks", "colbert_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"reranker.{name}={getattr(self, name)}: must be >= 1")
        if self.chunk_overlap < 0:
            raise ValueError(f"reranker.chunk_overlap={self.chunk_overlap}: must be >= 0")
        if not self.prompt:
            self.prompt = DEFAULT_LLM_PROMPT

    @classmethod
    def of(cls, settings: RerankerSettings) -> Self:
        """Exactly these settings of ``settings`` (an app config that extends them, e.g. with a
        training learning rate, keeps its own fields out of the saved model)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})
