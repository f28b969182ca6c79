"""LLM reranker training (task ``llm_reranker``): the Yes log-probability of a causal LM, with LoRA."""

from __future__ import annotations

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import ConfigError
from distributed_ir.models.llm_reranker import LLMReranker
from distributed_ir.train.tasks.reranker import PairwiseRerankerTask


class LLMRerankerTask(PairwiseRerankerTask):
    """Listwise or BCE over the pairs' Yes log-probabilities; LoRA (exported merged) on request."""

    name = "llm_reranker"
    model_class = LLMReranker
    supports_lora = True

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if cfg.lora.enabled and cfg.lora.export != "merged":
            raise ConfigError("llm_reranker exports merged weights: set lora.export=merged", key="lora.export")
        if cfg.reranker.head_lr:
            raise ConfigError(f"reranker.head_lr={cfg.reranker.head_lr}: an LLM reranker scores with its own LM "
                              "head (nothing new to train faster); leave head_lr at 0", key="reranker.head_lr")

    def build_reranker(self, weights_from: str | None) -> LLMReranker:
        model = super().build_reranker(weights_from)
        if self.cfg.lora.enabled:
            model.attach_lora(self.cfg.lora)
        return model
