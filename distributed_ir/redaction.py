"""Secret-looking keys in nested configs: found by name, their values replaced before a config is logged
or saved (logs, metrics.json, checkpoints)."""

from __future__ import annotations

import re
from typing import Any

SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials", "key"}


def is_secret_key(key: str) -> bool:
    """``hf_token``, ``api_key``, ``db-password``...: a name part is a secret word (``max_tokens``,
    ``tokenizer`` and ``key_path``-like names with a non-secret tail are not)."""
    parts = [p for p in re.split(r"[_\-.]", key.lower()) if p]
    return bool(parts) and (parts[-1] in SECRET_WORDS or any(p in SECRET_WORDS - {"key"} for p in parts))


def redact(data: Any) -> Any:
    """A copy of nested ``data`` with values of secret-looking keys replaced by ``"***"``
    (for configs written to logs, metrics.json and checkpoints)."""
    if isinstance(data, dict):
        return {k: "***" if isinstance(k, str) and is_secret_key(k) and v not in (None, "") else redact(v)
                for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data
