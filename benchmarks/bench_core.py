"""Side-by-side benchmark: edgeft MeZO (ONNX Runtime) vs torch MeZO vs torch LoRA + AdamW.

    python benchmarks/bench_core.py            # full run, writes docs/BENCHMARKS.md
    python benchmarks/bench_core.py --quick    # a few steps, to check that the script works

all-MiniLM-L6-v2 classification on Rotten Tomatoes (k shots per class, batch 16):

  (a) edgeft: MeZO through edgeft.runtime (Trainer + ONNX Runtime, forward passes only)
  (b) torch MeZO, the reference algorithm: perturb the LoRA + head parameters in place under
      no_grad, z regenerated from a seed with torch.Generator: θ+εz, θ−2εz, restore, θ −= lr·g·z
  (c) torch LoRA + AdamW through peft (backprop)

How it stays fair: a "prep" subprocess makes ONE plan (start adapter, every step's padded
batch, test set) with edgeft's own pieces, so all three methods start from the same point
and see the same token ids in the same order. Each method then trains in its OWN
subprocess; an "eval" subprocess scores every adapter with edgeft's ``evaluate`` (torch
values are copied back into the flat adapter vector), so accuracy comes from one code path.
The parent only orchestrates and never imports torch or onnxruntime: Linux carries
ru_maxrss across exec, so a child started by a big parent would report the parent's peak.
The torch workers never import onnxruntime either.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import machine_facts  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
LABELS = ["rotten", "fresh"]  # label ids 0, 1
METHODS = {  # key -> (table name, passes per step)
    "a": ("(a) edgeft MeZO, ONNX Runtime", "2 fwd"),
    "b": ("(b) torch MeZO (reference)", "2 fwd"),
    "c": ("(c) torch LoRA + AdamW (peft)", "1 fwd + 1 bwd"),
}
WARMUP = 3  # steps left out of the median step time (allocator, graph and thread-pool warm-up)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="fixed step budget per method")
    p.add_argument("--wall-s", type=float, default=60.0, help="wall-time budget (seconds of training)")
    p.add_argument("--test-size", type=int, default=1000, help="held-out examples (outside the k-shot set)")
    p.add_argument("--k", type=int, default=16, help="training examples per class")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4, help="MeZO learning rate, (a) and (b)")
    p.add_argument("--eps", type=float, default=1e-3, help="MeZO perturbation size, (a) and (b)")
    p.add_argument("--adam-lr", type=float, default=1e-3, help="AdamW learning rate, (c)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, ONNX Runtime and torch alike")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="abc", help="subset to run, e.g. 'ac'")
    p.add_argument("--out", type=Path, help="report (default docs/BENCHMARKS.md; --quick: in the cache)")
    p.add_argument("--quick", action="store_true", help="6 steps, 1 s wall budget, 64 test examples")
    p.add_argument("--worker", choices=["prep", "eval", *METHODS], help=argparse.SUPPRESS)  # internal
    p.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.wall_s, args.test_size = 6, 1.0, 64
    # a check run never overwrites the real numbers
    args.out = args.out or (CACHE / "BENCHMARKS-quick.md" if args.quick else REPO / "docs" / "BENCHMARKS.md")
    return args


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- shared steps: plan and evaluation, each in its own process --------------------


def worker_prep(cfg: dict, run_dir: Path) -> None:
    """Everything the methods share: bundle, k-shot set, every step's batch, test set, start adapter."""
    from edgeft.assets import minilm_folder, rotten_tomatoes
    from edgeft.data import Dataset, k_shot
    from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer, starting_adapter
    from edgeft.runtime.devices import DeviceProfile

    bundle_dir = CACHE / "minilm-rt"
    if not (bundle_dir / "edgeft.json").is_file():  # export once (~20 s)
        from edgeft.export import ExportOptions, export_bundle

        options = ExportOptions(task="classification", labels=LABELS, max_length=128)
        export_bundle(str(minilm_folder()), bundle_dir, options)

    texts, names = rotten_tomatoes()
    ids = np.array([LABELS.index(n) for n in names], dtype=np.int64)
    # k_shot returns texts, not positions; run it on the row numbers as "texts" to learn which
    # rows it drew (same labels, same seed → same draw), so the test set can exclude them.
    drawn = k_shot(Dataset([str(i) for i in range(len(texts))], ids), cfg["k"], cfg["seed"])
    train_rows = np.array([int(t) for t in drawn.texts])
    rest = np.setdiff1d(np.arange(len(texts)), train_rows)
    test_rows = np.sort(np.random.default_rng([cfg["seed"], 1]).choice(rest, cfg["test_size"], replace=False))

    bundle = Bundle(bundle_dir, DeviceProfile(threads=cfg["threads"]))
    enc_train = bundle.encode([texts[i] for i in train_rows], ids[train_rows])
    theta0, how = starting_adapter(bundle, enc_train, cfg["seed"])

    # The batch of every step, from the Trainer edgeft itself uses (worker (a) checks it matches).
    trainer = Trainer(bundle, enc_train, MeZO(theta0, MeZOConfig(total_steps=cfg["steps"], seed=cfg["seed"])),
                      TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"], seed=cfg["seed"]))
    arrays = {"theta0": theta0}
    for step in range(cfg["steps"]):
        index = trainer.batch_index(step)
        feeds = bundle.feeds(enc_train, index)
        arrays.update({f"index{step}": index, f"ids{step}": feeds["input_ids"],
                       f"mask{step}": feeds["attention_mask"], f"labels{step}": feeds["labels"]})
    np.savez(run_dir / "plan.npz", **arrays)
    cfg.update(bundle=str(bundle_dir), model=str(minilm_folder()), how=how,
               start_loss=float(bundle.run(bundle.feeds(enc_train, trainer.batch_index(0)), theta0)[0].mean()),
               train_texts=[texts[i] for i in train_rows], train_labels=ids[train_rows].tolist(),
               test_texts=[texts[i] for i in test_rows], test_labels=ids[test_rows].tolist())
    (run_dir / "plan.json").write_text(json.dumps(cfg))


def worker_eval(cfg: dict, run_dir: Path) -> None:
    """Held-out accuracy of the start and of every method's final and wall-time adapters."""
    from edgeft.runtime import Bundle, evaluate
    from edgeft.runtime.devices import DeviceProfile

    bundle = Bundle(cfg["bundle"], DeviceProfile(threads=cfg["threads"]))
    test = bundle.encode(cfg["test_texts"], np.array(cfg["test_labels"], dtype=np.int64))
    acc = {"start": evaluate(bundle, np.load(run_dir / "plan.npz")["theta0"], test, 32)["accuracy"]}
    for key in cfg["methods"]:
        vectors = np.load(run_dir / f"{key}.npz")
        acc[f"{key}.final"] = evaluate(bundle, vectors["final"], test, 32)["accuracy"]
        reached = json.loads((run_dir / f"{key}.json").read_text())["wall_step"]  # else wall = final
        acc[f"{key}.wall"] = evaluate(bundle, vectors["wall"], test, 32)["accuracy"] if reached else acc[f"{key}.final"]
    (run_dir / "eval.json").write_text(json.dumps(acc))


# --- workers: one method each, in its own process -------------------------------


def train_loop(cfg: dict, step_fn, vector_fn) -> tuple[dict, dict]:
    """Run ``cfg['steps']`` steps; snapshot the adapter when training time first passes wall_s."""
    times, losses, elapsed, wall_vec, wall_step = [], [], 0.0, None, None
    for step in range(cfg["steps"]):
        start = time.perf_counter()
        losses.append(float(step_fn(step)))
        times.append(time.perf_counter() - start)
        elapsed += times[-1]
        if wall_vec is None and elapsed >= cfg["wall_s"]:  # snapshot outside the timed section
            wall_vec, wall_step = vector_fn(), step + 1
    final = vector_fn()
    timed = times[WARMUP:] or times
    result = {"median_step_s": float(np.median(timed)), "train_s": elapsed, "wall_step": wall_step,
              "last10_loss": float(np.mean(losses[-10:])), "losses": losses}
    return result, {"final": final, "wall": final if wall_vec is None else wall_vec}


def worker_edgeft(cfg: dict, plan) -> tuple[dict, dict]:
    from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer
    from edgeft.runtime.devices import DeviceProfile

    bundle = Bundle(cfg["bundle"], DeviceProfile(threads=cfg["threads"]))
    enc = bundle.encode(cfg["train_texts"], np.array(cfg["train_labels"], dtype=np.int64))
    opt = MeZO(plan["theta0"], MeZOConfig(lr=cfg["lr"], eps=cfg["eps"], total_steps=cfg["steps"], seed=cfg["seed"]))
    trainer = Trainer(bundle, enc, opt, TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"],
                                                    eval_every=cfg["steps"] + 1, seed=cfg["seed"]))
    loaded = peak_rss_mb()

    def step(i):
        assert opt.step == i and np.array_equal(trainer.batch_index(i), plan[f"index{i}"]), "data order differs"
        return trainer.step().loss

    result, vectors = train_loop(cfg, step, lambda: opt.theta.copy())
    return {**result, "rss_loaded_mb": loaded}, vectors


def torch_model(cfg: dict, plan):
    """peft LoRA model + head at the plan's start adapter; params in the bundle's layout order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from edgeft.adapters import AdapterLayout
    from edgeft.manifest import Manifest

    torch.set_num_threads(cfg["threads"])
    manifest = Manifest.load(Path(cfg["bundle"]))
    assert manifest.pooling == "mean-normalized", "the torch head below assumes normalised mean pooling"
    layout = AdapterLayout(manifest.adapter)
    spec, base = layout.spec, AutoModel.from_pretrained(cfg["model"], attn_implementation="eager", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                            lora_dropout=0.0))
    model.eval()  # no dropout, like the exported graph
    lora = {n.replace(".default", ""): p for n, p in model.named_parameters() if ".lora_" in n}
    named = layout.unflatten(plan["theta0"])
    params = []
    for t in layout.tensors:
        p = lora.pop(t.peft_key) if t.peft_key else torch.nn.Parameter(torch.empty(t.shape))
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.array(named[t.name])))
        params.append(p)
    assert not lora, f"peft has LoRA parameters the bundle does not: {sorted(lora)[:2]}"
    head_w, head_b = (p for t, p in zip(layout.tensors, params) if t.role in ("head_weight", "head_bias"))

    def loss_fn(i):
        import torch.nn.functional as F

        ids, mask = torch.from_numpy(plan[f"ids{i}"]), torch.from_numpy(plan[f"mask{i}"])
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=-1)
        return F.cross_entropy(pooled @ head_w.T + head_b, torch.from_numpy(plan[f"labels{i}"]))

    def vector():
        return layout.flatten({t.name: p.detach().numpy() for t, p in zip(layout.tensors, params)})

    with torch.no_grad():
        start_loss = float(loss_fn(0))  # parity check against ORT, outside the timed loop
    return params, loss_fn, vector, start_loss


def worker_torch_mezo(cfg: dict, plan) -> tuple[dict, dict]:
    import torch

    params, loss_fn, vector, start_loss = torch_model(cfg, plan)
    loaded = peak_rss_mb()
    eps, lr = cfg["eps"], cfg["lr"]

    def perturb(seed: int, scale: float):
        """θ += scale·z, z regenerated from the seed (never stored) — MeZO's memory trick."""
        gen = torch.Generator().manual_seed(seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=scale)

    @torch.no_grad()
    def step(i):
        seed = cfg["seed"] * 1_000_003 + i
        perturb(seed, eps)
        loss_plus = float(loss_fn(i))
        perturb(seed, -2 * eps)
        loss_minus = float(loss_fn(i))
        perturb(seed, eps)  # restore θ
        g = (loss_plus - loss_minus) / (2 * eps)
        perturb(seed, -lr * g)  # θ −= lr·g·z
        return (loss_plus + loss_minus) / 2

    result, vectors = train_loop(cfg, step, vector)
    return {**result, "rss_loaded_mb": loaded, "start_loss": start_loss}, vectors


def worker_torch_adamw(cfg: dict, plan) -> tuple[dict, dict]:
    import torch

    params, loss_fn, vector, start_loss = torch_model(cfg, plan)
    # weight decay 0, as for MeZO: the comparison is about the gradient, not regularisation
    opt = torch.optim.AdamW(params, lr=cfg["adam_lr"], weight_decay=0.0)
    loaded = peak_rss_mb()

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(i)
        loss.backward()
        opt.step()
        return loss.item()

    result, vectors = train_loop(cfg, step, vector)
    return {**result, "rss_loaded_mb": loaded, "start_loss": start_loss}, vectors


def run_worker(key: str, run_dir: Path) -> None:
    cfg = json.loads((run_dir / "plan.json").read_text())
    if key in ("prep", "eval"):
        return (worker_prep if key == "prep" else worker_eval)(cfg, run_dir)
    worker = {"a": worker_edgeft, "b": worker_torch_mezo, "c": worker_torch_adamw}[key]
    result, vectors = worker(cfg, dict(np.load(run_dir / "plan.npz")))
    result["peak_rss_mb"] = peak_rss_mb()
    np.savez(run_dir / f"{key}.npz", **vectors)
    (run_dir / f"{key}.json").write_text(json.dumps(result))


# --- parent: orchestrate and report ---------------------------------------------------


def render(cfg: dict, rows: list[dict], acc: dict, facts: dict, quick: bool) -> tuple[str, str]:
    """(the whole markdown report, its results table)."""
    n, w = cfg["steps"], cfg["wall_s"]
    head = ["method", "passes / step", "step time, median (ms)", "peak RSS (MB)", "RSS before step 1 (MB)",
            "acc. start", f"acc. @ {n} steps", f"acc. @ {w:g} s (steps done)", f"time for {n} steps (s)",
            "train loss, last 10 steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        final, wall = acc[f"{r['key']}.final"], acc[f"{r['key']}.wall"]
        at_wall = f"{wall:.3f} ({r['wall_step']})" if r["wall_step"] else f"{final:.3f} (all {n} †)"
        cells = [r["name"], r["passes"], f"{r['median_step_s'] * 1e3:.0f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['rss_loaded_mb']:.0f}", f"{acc['start']:.3f}", f"{final:.3f}", at_wall,
                 f"{r['train_s']:.1f}", f"{r['last10_loss']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    parity = "; ".join(f"torch {r['key']} {r['start_loss']:.5f}" for r in rows if "start_loss" in r)
    quick_note = "**Check run (`--quick`): these numbers mean nothing.**\n\n" if quick else ""
    report = f"""# Benchmarks: forward-only vs backprop fine-tuning on CPU

{quick_note}all-MiniLM-L6-v2, Rotten Tomatoes, {cfg['k']} examples per class, batch {cfg['batch_size']}, the same
batches in the same order for every method. LoRA r=8, alpha=16 on `query,value` of every layer (A from seed
{cfg['seed']}, B=0) plus a classification head; start: {cfg['how']}. MeZO lr {cfg['lr']:g}, eps {cfg['eps']:g}
for (a) and (b); AdamW lr {cfg['adam_lr']:g}, weight decay 0 for (c). Dropout off everywhere (as in the exported
graph). {cfg['threads']} intra-op threads for ONNX Runtime and torch. Test set: {cfg['test_size']} held-out
examples, a seeded draw from those outside the k-shot set.

{table}

- Step time: median over steps {WARMUP + 1}..{n} (the first {WARMUP} are warm-up). Peak RSS: `ru_maxrss` of
  the method's own process (imports, model load and training; evaluation runs in another process).
- Accuracy: every adapter is scored by `edgeft.runtime.evaluate` (ONNX Runtime); the torch workers' LoRA and
  head values are copied back into edgeft's adapter vector. "@ {w:g} s": the adapter right after the step
  at which training time first reached {w:g} s. † the step budget ran out first; the final adapter is shown.
- Same start point: loss of step 0's batch at the start adapter: ONNX Runtime {cfg['start_loss']:.5f};
  {parity}.
- (b) draws z with `torch.Generator`, (a) with numpy, so (a) and (b) follow different random directions:
  they agree in distribution, not step by step.

## Machine

- CPU: {facts['cpu']}, {facts['cores']} cores. Load average at the start:
  {", ".join(f"{x:.1f}" for x in facts['load'])}. Step times are only comparable within one run; when other work
  shares the cores, multi-threaded torch slows down far more than ONNX Runtime (compare with `--threads 1`).
- Python {facts['python']}, torch {facts['torch']}, onnxruntime {facts['onnxruntime']},
  transformers {facts['transformers']}, peft {facts['peft']}
- Started: {facts['date']}
- Command: `{facts['command']}`
"""
    return report, table


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return run_worker(args.worker, args.plan)
    t0, facts = time.perf_counter(), machine_facts(("torch", "onnxruntime", "transformers", "peft"))  # load average before our own work
    run_dir = CACHE / ("run-quick" if args.quick else "run")
    run_dir.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")  # keep bundles and runs out of git
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quick", "worker", "plan")}
    (run_dir / "plan.json").write_text(json.dumps(settings))

    def spawn(key: str, what: str) -> None:
        print(f"[{time.perf_counter() - t0:4.0f} s] {what} ...", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key, "--plan", str(run_dir)]
        subprocess.run(cmd, check=True)

    spawn("prep", "export (first run only) and plan")
    rows = []
    for key in args.methods:
        spawn(key, METHODS[key][0])
        result = json.loads((run_dir / f"{key}.json").read_text())
        rows.append({**result, "key": key, "name": METHODS[key][0], "passes": METHODS[key][1]})
    spawn("eval", f"held-out accuracy ({args.test_size} examples)")
    cfg = json.loads((run_dir / "plan.json").read_text())
    acc = json.loads((run_dir / "eval.json").read_text())
    report, table = render(cfg, rows, acc, facts, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"\n{table}\n\nwritten to {args.out} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
