"""A Llama-family model of about a billion parameters built from a config (random weights: size and speed are
what docs/SCALE.md measures, not quality), saved as a Hugging Face folder with SmolLM2's tokenizer.

    python benchmarks/scale_model.py OUT [--layers 22]

Shape (issue 14): 22 layers, hidden 2048, FFN 5632, 32 heads, 4 KV heads, SmolLM2's 49,152-token vocabulary,
tied embeddings: 1.07 B parameters, 4.3 GB in fp32. Runs in its own process: it needs torch and transformers,
which the benchmark driver does not import."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build(out: Path, layers: int = 22, seed: int = 0) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edgeft import assets

    gguf = assets.smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    facts = {"parameters": params, "layers": layers, "fp32_bytes": params * 4}
    (out / "scale-model.json").write_text(json.dumps(facts, indent=1))
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.layers)))


if __name__ == "__main__":
    main()
