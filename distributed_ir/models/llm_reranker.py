"""LLM reranker: a causal LM asked whether the document answers the query (Yes/No).

Input (the FlagEmbedding ``bge-reranker-v2-gemma`` layout)::

    [BOS] "A: {query}" "\\n" "B: {document}" "\\n" "{prompt}"

The score is ``log_softmax([logit(Yes), logit(No)])[Yes]`` read at the **last real token**.
That token is found from the attention mask (``logits[:, -1]`` is a pad under right padding,
``mask.sum() - 1`` is wrong under left padding), and position ids are passed explicitly from
the mask (``cumsum - 1``) rather than left to the model's defaults, so the score is the same
under left and right padding (tested).  Only the Yes/No logits of one position per row are
taken from the LM head.  Training attaches LoRA (``attach_lora``); ``save`` writes merged full weights
(base + LoRA delta, computed without touching the live weights), so loading needs no PEFT.
Long documents are cut into overlapping token windows; score = max over windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_ir.models.pooling import last_token_index
from distributed_ir.models.reranker_base import RerankerBase, chunk_ids, load_hf, pad_batch, write_settings
from distributed_ir.models.settings import RerankerSettings


def first_token(tokenizer: Any, word: str) -> int:
    """The id of ``word``'s first token (FlagEmbedding's convention: ``input_ids[0]``)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{word!r} tokenizes to nothing with this tokenizer")
    return int(ids[0])


class LLMReranker(RerankerBase):
    """``forward(input_ids, attention_mask) -> [batch]`` Yes-log-probabilities."""

    kind = "llm_reranker"

    def __init__(self, lm: nn.Module, tokenizer: Any, settings: RerankerSettings):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.settings = settings
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.yes_id = first_token(tokenizer, "Yes")
        self.no_id = first_token(tokenizer, "No")
        if self.yes_id == self.no_id:
            raise ValueError("'Yes' and 'No' start with the same token for this tokenizer: cannot score")
        self.lora = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, settings: RerankerSettings | None = None,
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                        **overrides: Any) -> LLMReranker:
        from transformers import AutoModelForCausalLM

        _, settings, tokenizer, lm = load_hf(AutoModelForCausalLM, name_or_path, settings, dtype,
                                             trust_remote_code, overrides)
        return cls(lm, tokenizer, settings)

    def attach_lora(self, cfg: Any) -> None:
        """Inject LoRA adapters (``config.LoraSettings``) in place; only they train.

        peft wraps the LM, but the adapters live inside ``self.lm``'s own modules, so this class
        keeps calling the LM as before; ``all-linear`` leaves the output head alone.
        """
        from distributed_ir.models.lora import apply_lora

        apply_lora(self.lm, cfg, self.lm.config.name_or_path or ".")
        self.lora = True

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights with every LoRA delta added (the live model is left untouched)."""
        state = {k: v.detach() for k, v in self.lm.state_dict().items()}
        if not self.lora:
            return state
        from peft.tuners.lora import LoraLayer

        with torch.no_grad():
            for name, module in self.lm.named_modules():
                if isinstance(module, LoraLayer):
                    weight = state.pop(f"{name}.base_layer.weight")
                    for adapter in module.active_adapters:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                    state[f"{name}.weight"] = weight
                    if f"{name}.base_layer.bias" in state:
                        state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
        return {k: v for k, v in state.items() if "lora_" not in k}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.merged_state_dict()
        if self.lora:
            # save_pretrained walks the live (LoRA-injected) modules; hand it clean names and weights,
            # in the live model's dtype (the config's may be stale after a cast, and fp32 doubles the file)
            from transformers import AutoModelForCausalLM

            clean = AutoModelForCausalLM.from_config(self.lm.config, dtype=self.lm.dtype)
            missing, unexpected = clean.load_state_dict(state, strict=False)
            if missing or unexpected:  # strict=True's own error would not say why; a gap keeps random weights
                raise RuntimeError(f"merged LoRA weights do not fit {type(clean).__name__}: missing {missing}, "
                                   f"unexpected {unexpected}")
            clean.save_pretrained(path, safe_serialization=True)
        else:
            self.lm.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        write_settings(path, self.kind, self.settings, {"similarity": "log_p_yes", "yes_token": self.yes_id,
                                             "no_token": self.no_id})
        return path

    # ------------------------------------------------------------------ inputs
    def _pieces(self) -> tuple[list[int], list[int], list[int]]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        sep = tok("\n", add_special_tokens=False)["input_ids"]
        prompt = tok(self.settings.prompt, add_special_tokens=False)["input_ids"]
        return bos, sep, prompt

    def build_units(self, queries: Sequence[str], documents: Sequence[str]) -> tuple[list[dict], list[int]]:
        s = self.settings
        bos, sep, prompt = self._pieces()
        q_ids = self.tokenizer([f"A: {q}" for q in queries], add_special_tokens=False)["input_ids"]
        d_ids = self.tokenizer([f"B: {d}" for d in documents], add_special_tokens=False)["input_ids"]
        units, owners = [], []
        for i, (q, d) in enumerate(zip(q_ids, d_ids)):
            q = q[:s.query_max_length]
            room = s.max_length - len(bos) - len(q) - 2 * len(sep) - len(prompt)
            if room < 1:
                raise ValueError(f"max_length={s.max_length} leaves no room for the document after the query "
                                 f"({len(q)} tokens) and the prompt ({len(prompt)} tokens)")
            for chunk in chunk_ids(d, room, s.chunk_overlap, s.max_chunks):
                units.append({"input_ids": bos + q + sep + chunk + sep + prompt})
                owners.append(i)
        return units, owners

    def collate(self, units: list[dict], side: str | None = None) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([u["input_ids"] for u in units], self.tokenizer.pad_token_id,
                              side or self.tokenizer.padding_side)
        return {"input_ids": ids, "attention_mask": mask}

    def features(self, queries: Sequence[str], documents: Sequence[str]) -> dict[str, torch.Tensor]:
        """CPU model inputs for training: one row per pair (its first chunk)."""
        units, owners = self.build_units(queries, documents)
        first = {}
        for unit, owner in zip(units, owners):
            first.setdefault(owner, unit)
        return self.collate([first[i] for i in range(len(queries))])

    # ------------------------------------------------------------------ forward
    def scoring_backbone(self) -> nn.Module:
        """The decoder stack: forward applies the LM head to its last real token only, so the
        causal LM's own forward (logits at every position) never runs."""
        return getattr(self.lm, self.lm.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.scoring_backbone()(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        logits = self.lm.get_output_embeddings()(last)[:, [self.yes_id, self.no_id]].float()
        return torch.log_softmax(logits, dim=-1)[:, 0]

    def score_units(self, units: list[dict]) -> torch.Tensor:
        return self(**{k: v.to(self.device) for k, v in self.collate(units).items()})
