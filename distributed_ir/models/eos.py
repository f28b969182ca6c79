"""EOS appended by the tokenizer itself, so every loader of a saved folder tokenizes alike.

Last-token pooling needs each sequence to end with EOS.  Appending it by hand after tokenising
works for this project's own encode, but ``SentenceTransformer(path)`` would load the same folder
without it and compute different vectors.  So, for fast tokenizers, EOS goes into the
tokenizer's post-processor (a ``TemplateProcessing``, as Qwen3-Embedding ships it): truncation
then keeps room for it, and the saved ``tokenizer.json`` carries it to every loader.
"""

from __future__ import annotations

import json
from typing import Any

_PIECE_KEYS = ("SpecialToken", "Sequence")


def _template(pieces: list[dict[str, Any]]) -> str:
    out = []
    for piece in pieces:
        if "SpecialToken" in piece:
            out.append(f"{piece['SpecialToken']['id']}:{piece['SpecialToken']['type_id']}")
        else:
            out.append(f"${piece['Sequence']['id']}:{piece['Sequence']['type_id']}")
    return " ".join(out)


def _current_templates(tokenizer: Any) -> tuple[list[dict], list[dict]] | None:
    """(single, pair) templates equivalent to the tokenizer's post-processor; None if unknown."""
    pp = json.loads(tokenizer.backend_tokenizer.to_str()).get("post_processor")
    a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    if pp is None or pp["type"] == "ByteLevel":  # ByteLevel only adjusts offsets
        return [a], [a, b]
    if pp["type"] == "TemplateProcessing":
        return pp["single"], pp["pair"]
    if pp["type"] in ("BertProcessing", "RobertaProcessing"):
        cls, sep = ({"SpecialToken": {"id": pp[k][0], "type_id": t}} for k, t in (("cls", 0), ("sep", 0)))
        sep1 = {"SpecialToken": {"id": pp["sep"][0], "type_id": 1}}
        return [cls, a, sep], [cls, a, sep, b, sep1]
    return None


def tokenizer_appends_eos(tokenizer: Any) -> bool:
    """Make a fast ``tokenizer`` end every sequence with its EOS token (in place).  True when it
    now does (or already did); False when that is not possible (slow tokenizer, unknown
    post-processor), in which case the caller appends EOS itself."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is None or not getattr(tokenizer, "is_fast", False):
        return False
    templates = _current_templates(tokenizer)
    if templates is None:
        return False
    single, pair = templates
    if single and single[-1].get("SpecialToken", {}).get("id") == eos:
        return True
    single = single + [{"SpecialToken": {"id": eos, "type_id": 0}}]
    pair = pair + [{"SpecialToken": {"id": eos, "type_id": 1}}]
    names = {p["SpecialToken"]["id"] for p in single + pair if "SpecialToken" in p}
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=_template(single), pair=_template(pair),
        special_tokens=[(n, tokenizer.convert_tokens_to_ids(n)) for n in sorted(names)])
    return tokenizer(["x"])["input_ids"][0][-1] == eos_id
