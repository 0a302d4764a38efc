"""The backprop reference of bench_learning.py: peft LoRA + AdamW in torch, in its own process.

    python benchmarks/learning_backprop.py --bundle LM_BUNDLE --work DIR --seed S [--batch-size 4] [--steps 40]
    python benchmarks/learning_backprop.py --prompt --bundle PROMPT_BUNDLE --work DIR --seed S [--steps 100] [--lr 3e-4]

Prompt mode (``--prompt``): DIR/rt-{train,dev,test}.jsonl; the k-shot draw ``edgeft train --k-shot 16 --seed S``
makes of the training file, the whole draw as the batch, the loss the bundle's (cross-entropy over the label
words' logits at the last prompt token, the template and left truncation as the bundle encodes them); the LoRA
with the best dev accuracy (then loss) every 10 steps kept; test accuracy.

Trains on the windows edgeft's Bundle.encode makes of DIR/train.jsonl, in the batches edgeft train draws
(``edgeft.data.epoch_batch``, the trainer's stream), keeps the LoRA with the lowest dev loss every 10 steps,
and prints one JSON line: its test perplexity, time and peak RSS. It reads the bundle's tokenizer and
manifest but never opens the ONNX graph, so the process's memory is torch's alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BATCH_STREAM = 7  # edgeft.runtime.trainer.BATCH_STREAM (not imported: that would load onnxruntime here)


def _windows(tokenizer, path: Path, length: int) -> list[list[int]]:
    """The windows edgeft's Bundle.encode makes of a causal-LM data file (consecutive, ≥ 2 tokens)."""
    out = []
    for line in path.read_text().splitlines():
        ids = tokenizer.encode(json.loads(line)["text"]).ids
        out += [ids[i : i + length] for i in range(0, len(ids), length) if len(ids[i : i + length]) >= 2]
    return out


def backprop_worker(args) -> None:
    """peft LoRA + AdamW on the same windows, batches and keep-best rule as edgeft train; prints one JSON line."""
    import resource

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from edgeft import assets
    from edgeft.data import epoch_batch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    seed, batch_size = args.seed, args.batch_size
    manifest = json.loads((args.bundle / "edgeft.json").read_text())
    length, pad = manifest["max_length"], manifest["pad_token_id"]
    tok = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    data = {k: _windows(tok, args.work / f"{k}.jsonl", length) for k in ("train", "dev", "test")}
    gguf = assets.smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)

    def batch(rows):
        width = max(len(rows[i]) for i in range(len(rows)))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return ids, mask

    def nll(rows):
        ids, mask = batch(rows)
        logits = model(input_ids=ids, attention_mask=mask).logits
        per = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        m = mask[:, 1:].float()
        return (per * m).sum(), m.sum()

    def evaluate(windows):
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for i in range(0, len(windows), 8):
                s, c = nll(windows[i : i + 8])
                total, count = total + float(s), count + float(c)
        model.train()
        return total / count

    n = len(data["train"])
    best = (evaluate(data["dev"]), 0, {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k})
    started = time.perf_counter()
    best_elapsed = 0.0
    for step in range(args.steps):
        if args.seconds is not None and time.perf_counter() - started >= args.seconds:
            args.steps = step  # a time budget, as edgeft train's: stop after the step that crossed it
            break
        rows = [data["train"][i] for i in epoch_batch(n, batch_size, seed, BATCH_STREAM, step)]
        s, c = nll(rows)
        (s / c).backward()
        optim.step()
        optim.zero_grad()
        if (step + 1) % 10 == 0 or step + 1 == args.steps or (args.seconds is not None and time.perf_counter() - started >= args.seconds):
            dev = evaluate(data["dev"])
            if dev < best[0]:
                best = (dev, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k})
                best_elapsed = time.perf_counter() - started
    elapsed = time.perf_counter() - started
    model.load_state_dict(best[2], strict=False)
    test = evaluate(data["test"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"train": {"steps": args.steps, "forward_passes": args.steps, "elapsed_s": round(elapsed, 1),
                                "peak_rss_mb": round(peak, 1), "best_step": best[1], "elapsed_s_to_best": round(best_elapsed, 1),
                                "note": "each step is one forward + one backward pass"},
                      "test": {"loss": test, "perplexity": float(np.exp(test)), "tokens": sum(len(w) - 1 for w in data["test"])}}))


def prompt_worker(args) -> None:
    """peft LoRA (q, v) + AdamW from the zero-shot prompt, on the bundle's own prompt loss; prints one JSON line."""
    import resource

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from edgeft import assets
    from edgeft.data import k_shot, load_dataset

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    manifest = json.loads((args.bundle / "edgeft.json").read_text())
    labels, template = manifest["labels"], manifest["template"]
    tok = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(manifest["max_length"], direction=manifest.get("truncation_side", "left"))
    # the label words' first tokens as they follow the template (export/bundle.py _label_token)
    words = torch.tensor([tok.encode(" " + manifest["verbalizer"][name], add_special_tokens=False).ids[0] for name in labels])

    def encoded(dataset):
        ids = [e.ids for e in tok.encode_batch([template.replace("{text}", t) for t in dataset.texts])]
        return ids, torch.tensor(np.asarray(dataset.labels), dtype=torch.long)

    files = {k: args.work / f"rt-{k}.jsonl" for k in ("train", "dev", "test")}
    data = {"train": encoded(k_shot(load_dataset(files["train"], labels), 16, args.seed)),
            **{k: encoded(load_dataset(files[k], labels)) for k in ("dev", "test")}}
    gguf = assets.smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    pad = manifest["pad_token_id"]

    def label_logits(rows):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1  # right-padded: the last prompt token predicts the label word
        # the LM head's label-word rows at that position only, as the bundle's graph computes them (the whole
        # [rows, length, vocab] logits would cost backprop ~1 GB and a third of its step for nothing)
        return hidden[torch.arange(len(rows)), last] @ model.base_model.model.lm_head.weight[words].T

    def evaluate(part):
        ids, y = data[part]
        model.eval()
        with torch.no_grad():
            z = torch.cat([label_logits(ids[i : i + 32]) for i in range(0, len(ids), 32)])
        model.train()
        loss = float(torch.nn.functional.cross_entropy(z, y))
        return {"accuracy": float((z.argmax(1) == y).float().mean()), "loss": loss, "examples": len(ids)}

    def rank(m):
        return (m["accuracy"], -m["loss"])

    lora = lambda: {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k}  # noqa: E731
    start = evaluate("dev")
    best, curve = (start, 0, lora()), [{"step": 0, **start}]
    started, best_elapsed = time.perf_counter(), 0.0
    ids, y = data["train"]
    steps = args.steps
    for step in range(args.steps):
        if args.seconds is not None and time.perf_counter() - started >= args.seconds:
            steps = step
            break
        loss = torch.nn.functional.cross_entropy(label_logits(ids), y)  # the whole k-shot set is the batch
        loss.backward()
        optim.step()
        optim.zero_grad()
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            dev = evaluate("dev")
            curve.append({"step": step + 1, "train_loss": float(loss), **dev})
            if rank(dev) > rank(best[0]):
                best, best_elapsed = (dev, step + 1, lora()), time.perf_counter() - started
    elapsed = time.perf_counter() - started
    model.load_state_dict(best[2], strict=False)
    test = evaluate("test")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"train": {"steps": steps, "forward_passes": steps, "elapsed_s": round(elapsed, 1), "lr": args.lr,
                                "peak_rss_mb": round(peak, 1), "best_step": best[1], "elapsed_s_to_best": round(best_elapsed, 1),
                                "best": best[0], "note": "each step is one forward + one backward pass of the 32 examples"},
                      "dev_curve": curve, "test": test}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--work", required=True, type=Path, help="holds train.jsonl, dev.jsonl, test.jsonl")
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seconds", type=float, help="stop after the step that crosses this much training time")
    p.add_argument("--prompt", action="store_true", help="prompt mode on Rotten Tomatoes (rt-prompt)")
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    (prompt_worker if args.prompt else backprop_worker)(args)


if __name__ == "__main__":
    main()
