"""Which parameters, trained with exact gradients (torch backprop), buy how much of backprop's gain?

    python benchmarks/trial_output_side.py CONFIG [--seed 0]      # CONFIG e.g. bias, bias+mlp29-hi, qvall

The trial that chose the causal LM's output fit (export/top_mlp.py): SmolLM2-135M on the Shakespeare
task of bench_learning.py (training windows of 128 tokens from Hamlet, Othello and King Lear; the kept
step chosen every 10 steps on 16 windows of Romeo and Juliet; test perplexity on the first 8,192 tokens
of Macbeth), 40 Adam steps of batch 4 (edgeft's batch order), the rest of the model frozen. CONFIG
joins with "+": ``bias`` (output bias over the vocabulary, lr 3e-2); LoRA r=8 on ``down29`` (the top
layer's down projection), ``mlp29`` (its gate, up and down), ``o29`` (its attention output projection), ``attn29`` (its q, k, v
and o), ``mlptopN`` (gate, up, down of the top N = 2, 3 or 6 layers), ``qvtop6`` (q, v of the top 6 layers),
``qvall`` (q, v of every layer: the backprop reference); ``hi``: LoRA lr 3e-3 instead of 3e-4; ``rN``: LoRA
rank N instead of 8 (alpha 2N, the same scale). One JSON
line per run is appended to docs/top-trial/results.jsonl. Reads the GGUF asset; needs torch and peft.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "top-trial" / "results.jsonl"
TRAIN = ("tragedies/hamlet", "tragedies/othello", "tragedies/king-lear")


def main(argv=None) -> None:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft import assets
    from edgeft.data import epoch_batch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config, seed = args.config, args.seed
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    gguf = assets.smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).backend_tokenizer
    plays = assets.shakespeare()

    def windows(text, limit=None):
        ids = tok.encode(text).ids[:limit]
        return [ids[i : i + 128] for i in range(0, len(ids), 128) if len(ids[i : i + 128]) >= 2]

    train = [w for p_ in TRAIN for w in windows(plays[p_])]
    dev, test = windows(plays["tragedies/romeo-and-juliet"], 128 * 16), windows(plays["tragedies/macbeth"], 8192)
    top = model.config.num_hidden_layers - 1
    bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    params = [(bias, 3e-2)] if "bias" in config.split("+") else []
    targets = []
    if "down29" in config:
        targets.append(f"model.layers.{top}.mlp.down_proj")
    if "mlp29" in config:
        targets += [f"model.layers.{top}.mlp.{m}" for m in ("down_proj", "gate_proj", "up_proj")]
    if "o29" in config:
        targets.append(f"model.layers.{top}.self_attn.o_proj")
    if "attn29" in config:
        targets += [f"model.layers.{top}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    for depth in (2, 3, 6):  # "mlptopN": gate, up and down of the top N layers
        if f"mlptop{depth}" in config:
            targets += [f"model.layers.{l}.mlp.{m}" for l in range(top - depth + 1, top + 1) for m in ("down_proj", "gate_proj", "up_proj")]
    if "qvtop6" in config:
        targets += [f"model.layers.{l}.self_attn.{m}" for l in range(top - 5, top + 1) for m in ("q_proj", "v_proj")]
    if "qvall" in config:
        targets += ["q_proj", "v_proj"]
    if targets:
        rank = next((int(t[1:]) for t in config.split("+") if t[:1] == "r" and t[1:].isdigit()), 8)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
        params += [(q, 3e-3 if "hi" in config else 3e-4) for q in model.parameters() if q.requires_grad]
    else:
        model.requires_grad_(False)
    opt = torch.optim.Adam([{"params": [q], "lr": lr} for q, lr in params])

    def nll(rows):
        width = max(map(len, rows))
        ids, mask = torch.zeros((len(rows), width), dtype=torch.long), torch.zeros((len(rows), width))
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        logits = model(input_ids=ids, attention_mask=mask.long()).logits + bias
        per = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return (per * mask[:, 1:]).sum(), mask[:, 1:].sum()

    def evaluate(ws):
        with torch.no_grad():
            sums = [nll(ws[i : i + 8]) for i in range(0, len(ws), 8)]
        return sum(float(s) for s, _ in sums) / sum(float(c) for _, c in sums)

    def snapshot():
        return [q.detach().clone() for q, _ in params]

    best, started = (evaluate(dev), 0, snapshot()), time.perf_counter()
    for step in range(40):
        s, c = nll([train[i] for i in epoch_batch(len(train), 4, seed, 7, step)])
        (s / c).backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 10 == 0 and (d := evaluate(dev)) < best[0]:
            best = (d, step + 1, snapshot())
    with torch.no_grad():
        for (q, _), v in zip(params, best[2]):
            q.copy_(v)
    out = {"config": config, "seed": seed, "best_step": best[1], "dev_ppl": float(np.exp(best[0])),
           "test_ppl": float(np.exp(evaluate(test))), "train_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(out))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
