"""LoRA adapters through peft: wrap a backbone, save adapter files, load and merge them.

An adapter export is a folder with peft's ``adapter_config.json`` + ``adapter_model.safetensors``
(its ``base_model_name_or_path`` is the local base folder), the tokenizer, and the embedder's
``distributed_ir.json``; loading it reads the base from that path and merges the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distributed_ir.config_loader import ConfigError
from distributed_ir.models.settings import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"


def apply_lora(backbone: nn.Module, cfg: LoraSettings, base_path: str) -> nn.Module:
    """Return ``backbone`` wrapped as a peft model whose only trainable weights are the adapters."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: Any = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              bias="none")
    try:
        model = get_peft_model(backbone, peft_cfg)
    except ValueError as e:  # peft names the modules it could not find
        raise ConfigError(f"lora.target_modules={cfg.target_modules}: {e}") from None
    model.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return model


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_path(path: str | Path) -> str:
    """The local base model folder an adapter export was trained on."""
    import json

    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    base = cfg.get("base_model_name_or_path") or ""
    if not Path(base).is_dir():
        raise ConfigError(
            f"{Path(path) / ADAPTER_CONFIG}: base_model_name_or_path={base!r} is not a local folder; "
            "edit it to point at the base model the adapter was trained on"
        )
    return base


def load_adapter(backbone: nn.Module, path: str | Path, merge: bool = True) -> nn.Module:
    """Attach the saved adapter at ``path`` to ``backbone``; merged into plain weights by default."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(backbone, str(path), is_trainable=not merge)
    return model.merge_and_unload() if merge else model
