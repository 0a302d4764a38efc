"""Side-by-side benchmark: edgeft MeZO (ONNX Runtime) vs torch MeZO vs torch LoRA + AdamW.

    python benchmarks/bench_core.py                 # full run, writes docs/BENCHMARKS.md
    python benchmarks/bench_core.py --quick         # a few steps, to check the script works

all-MiniLM-L6-v2 classification on Rotten Tomatoes (k shots per class, batch 16):

  (a) edgeft: MeZO through edgeft.runtime (Trainer + ONNX Runtime, forward passes only)
  (b) torch MeZO: the reference algorithm — perturb the LoRA + head parameters in place
      under no_grad, z regenerated from a seed with torch.Generator: θ+εz, θ−2εz, restore,
      θ −= lr·g·z
  (c) torch LoRA + AdamW through peft (backprop)

Fairness: the parent process prepares ONE plan (start adapter, batches, test set) and
every method runs in its OWN subprocess, so ru_maxrss is the peak of that method alone.
The torch workers never import onnxruntime: their padded batches come precomputed from
the plan (made with the bundle's tokenizer and ``Bundle.feeds``, so all three see the same
token ids in the same order). Evaluation runs in the parent, with edgeft's ``evaluate``
for all three methods (torch parameters are copied back into the flat adapter vector),
so accuracy is measured by one code path and evaluation never counts toward a worker's RSS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
LABELS = ["rotten", "fresh"]  # label ids 0, 1
METHODS = {  # key -> (table name, passes per step)
    "a": ("(a) edgeft MeZO, ONNX Runtime", "2 fwd"),
    "b": ("(b) torch MeZO (reference)", "2 fwd"),
    "c": ("(c) torch LoRA + AdamW (peft)", "1 fwd + 1 bwd"),
}
WARMUP = 3  # steps left out of the median step time (allocator, graph and thread-pool warm-up)
THREADS = 2  # same thread count for ORT and torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="fixed step budget per method")
    p.add_argument("--wall-s", type=float, default=60.0, help="wall-time budget (training seconds)")
    p.add_argument("--test-size", type=int, default=1000, help="held-out examples (not in the k-shot set)")
    p.add_argument("--k", type=int, default=16, help="training examples per class")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4, help="MeZO learning rate, (a) and (b)")
    p.add_argument("--eps", type=float, default=1e-3, help="MeZO perturbation size, (a) and (b)")
    p.add_argument("--adam-lr", type=float, default=1e-3, help="AdamW learning rate, (c)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="abc", help="subset to run, e.g. 'ac'")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown report (default docs/BENCHMARKS.md; with --quick a file in the cache, "
                        "so a check run never overwrites real numbers)")
    p.add_argument("--quick", action="store_true", help="6 steps, 1 s wall budget, 64 test examples")
    p.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)  # internal: run one method
    p.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.wall_s, args.test_size = 6, 1.0, 64
    if args.out is None:
        args.out = CACHE / "BENCHMARKS-quick.md" if args.quick else REPO / "docs" / "BENCHMARKS.md"
    return args


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- parent: bundle, plan, evaluation -----------------------------------------


def ensure_bundle() -> Path:
    """Export the classification bundle once into the cache (~20 s, needs torch)."""
    from edgeft.assets import minilm_folder

    out = CACHE / "minilm-rt"
    if not (out / "edgeft.json").is_file():
        from edgeft.export import ExportOptions, export_bundle

        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / ".gitignore").write_text("*\n")  # keep bundles and runs out of git
        export_bundle(str(minilm_folder()), out, ExportOptions(task="classification", labels=LABELS, max_length=128))
    return out


def make_plan(args, bundle_dir: Path, run_dir: Path):
    """Everything the three methods share: k-shot set, batches per step, test set, start adapter."""
    from edgeft.assets import minilm_folder, rotten_tomatoes
    from edgeft.data import Dataset, k_shot
    from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer, starting_adapter
    from edgeft.runtime.devices import DeviceProfile

    texts, names = rotten_tomatoes()
    ids = np.array([LABELS.index(n) for n in names], dtype=np.int64)
    # k_shot returns texts, not positions; run it on the row numbers as "texts" to learn which
    # rows it drew (same labels, same seed → same draw), so the test set can exclude them.
    drawn = k_shot(Dataset([str(i) for i in range(len(texts))], ids), args.k, args.seed)
    train_rows = np.array([int(t) for t in drawn.texts])
    rest = np.setdiff1d(np.arange(len(texts)), train_rows)
    test_rows = np.sort(np.random.default_rng([args.seed, 1]).choice(rest, args.test_size, replace=False))

    bundle = Bundle(bundle_dir, DeviceProfile(threads=THREADS))
    enc_train = bundle.encode([texts[i] for i in train_rows], ids[train_rows])
    enc_test = bundle.encode([texts[i] for i in test_rows], ids[test_rows])
    theta0, how = starting_adapter(bundle, enc_train, args.seed)

    # The batch of every step, from the Trainer edgeft itself uses (worker (a) checks it matches).
    trainer = Trainer(bundle, enc_train, MeZO(theta0, MeZOConfig(total_steps=args.steps, seed=args.seed)),
                      TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed))
    arrays = {"theta0": theta0}
    for step in range(args.steps):
        index = trainer.batch_index(step)
        feeds = bundle.feeds(enc_train, index)
        arrays.update({f"index{step}": index, f"ids{step}": feeds["input_ids"],
                       f"mask{step}": feeds["attention_mask"], f"labels{step}": feeds["labels"]})
    start_loss = float(bundle.run(bundle.feeds(enc_train, trainer.batch_index(0)), theta0)[0].mean())

    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez(run_dir / "plan.npz", **arrays)
    config = {"bundle": str(bundle_dir), "model": str(minilm_folder()), "steps": args.steps, "wall_s": args.wall_s,
              "lr": args.lr, "eps": args.eps, "adam_lr": args.adam_lr, "seed": args.seed,
              "batch_size": args.batch_size, "train_texts": [texts[i] for i in train_rows],
              "train_labels": ids[train_rows].tolist()}
    (run_dir / "plan.json").write_text(json.dumps(config))
    return bundle, enc_test, theta0, how, start_loss


# --- workers: one method each, in its own process -------------------------------


def train_loop(cfg: dict, step_fn, vector_fn) -> tuple[dict, dict]:
    """Run ``cfg['steps']`` steps; snapshot the adapter when training time first passes wall_s."""
    times, losses, elapsed = [], [], 0.0
    wall_vec, wall_step = None, None
    for step in range(cfg["steps"]):
        start = time.perf_counter()
        losses.append(float(step_fn(step)))
        times.append(time.perf_counter() - start)
        elapsed += times[-1]
        if wall_vec is None and elapsed >= cfg["wall_s"]:  # snapshot outside the timed section
            wall_vec, wall_step = vector_fn(), step + 1
    final = vector_fn()
    timed = times[WARMUP:] or times
    result = {"median_step_s": float(np.median(timed)), "train_s": elapsed, "steps": cfg["steps"],
              "wall_step": wall_step, "last10_loss": float(np.mean(losses[-10:])), "losses": losses}
    return result, {"final": final, "wall": final if wall_vec is None else wall_vec}


def worker_edgeft(cfg: dict, plan) -> tuple[dict, dict]:
    from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer
    from edgeft.runtime.devices import DeviceProfile

    bundle = Bundle(cfg["bundle"], DeviceProfile(threads=THREADS))
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

    torch.set_num_threads(THREADS)
    manifest = Manifest.load(Path(cfg["bundle"]))
    assert manifest.pooling == "mean-normalized", "the torch head below assumes normalised mean pooling"
    layout = AdapterLayout(manifest.adapter)
    spec = layout.spec
    base = AutoModel.from_pretrained(cfg["model"], attn_implementation="eager", dtype=torch.float32)
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
    by_role = {t.role: p for t, p in zip(layout.tensors, params)}
    head_w, head_b = by_role["head_weight"], by_role["head_bias"]

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


def run_worker(method: str, run_dir: Path) -> None:
    cfg = json.loads((run_dir / "plan.json").read_text())
    plan = dict(np.load(run_dir / "plan.npz"))
    fn = {"a": worker_edgeft, "b": worker_torch_mezo, "c": worker_torch_adamw}[method]
    result, vectors = fn(cfg, plan)
    result["peak_rss_mb"] = peak_rss_mb()
    np.savez(run_dir / f"{method}.npz", **vectors)
    (run_dir / f"{method}.json").write_text(json.dumps(result))


# --- report -----------------------------------------------------------------------


def machine_facts(argv: list[str]) -> dict:
    import onnxruntime
    import peft
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "command": "python " + " ".join(shlex.quote(a) for a in argv)}


def render(args, rows: list[dict], facts: dict, how: str, start_acc: float, start_loss: float) -> tuple[str, str]:
    """(the whole markdown report, its results table)."""
    n, w = args.steps, args.wall_s
    head = ["method", "passes / step", "step time, median (ms)", "peak RSS (MB)", "model loaded (MB)",
            "acc. start", f"acc. @ {n} steps", f"acc. @ {w:g} s (steps done)", f"time for {n} steps (s)",
            "train loss, last 10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        at_wall = f"{r['acc_wall']:.3f} ({r['wall_step']})" if r["wall_step"] else f"{r['acc_final']:.3f} (all {n} †)"
        cells = [r["name"], r["passes"], f"{r['median_step_s'] * 1e3:.0f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['rss_loaded_mb']:.0f}", f"{start_acc:.3f}", f"{r['acc_final']:.3f}", at_wall,
                 f"{r['train_s']:.1f}", f"{r['last10_loss']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    parity = ", ".join(f"{r['key']} {r['start_loss']:.5f}" for r in rows if "start_loss" in r)
    quick = "**Quick check run (`--quick`): these numbers mean nothing.**\n\n" if args.quick else ""
    return f"""# Benchmarks: forward-only vs backprop fine-tuning on CPU

{quick}all-MiniLM-L6-v2, Rotten Tomatoes, {args.k} examples per class, batch {args.batch_size}, the same batches in the
same order for every method. LoRA r=8, alpha=16 on `query,value` of every layer (A from seed {args.seed}, B=0) plus a
classification head; start: {how}. MeZO lr {args.lr:g}, eps {args.eps:g} for (a) and (b); AdamW lr {args.adam_lr:g},
weight decay 0 for (c). {THREADS} threads for ONNX Runtime and torch. Test set: {args.test_size} held-out examples
(seeded draw from the examples outside the k-shot set).

{table}

- Step time: median over steps {WARMUP + 1}..{n} (the first {WARMUP} are warm-up). Peak RSS: `ru_maxrss` of the
  method's own process (model load + training; evaluation runs elsewhere); "model loaded" is the peak before
  the first step.
- Accuracy: every adapter is evaluated by `edgeft.runtime.evaluate` (ONNX Runtime); the torch workers' LoRA and
  head values are copied back into edgeft's adapter vector. "@ {w:g} s": the adapter right after the step at
  which training time first reached {w:g} s. † the step budget ran out first; the final adapter is shown.
- Same start point: loss of step 0's batch at the start adapter — ONNX Runtime {start_loss:.5f}; torch {parity}.
- (b) draws z with `torch.Generator`, (a) with numpy, so (a) and (b) follow different random directions:
  they agree in distribution, not step by step.

## Machine

- CPU: {facts['cpu']} ({facts['cores']} cores), shared and noisy: compare methods within one run.
- Python {facts['python']}, torch {facts['torch']}, onnxruntime {facts['onnxruntime']},
  transformers {facts['transformers']}, peft {facts['peft']}
- Date: {facts['date']}
- Command: `{facts['command']}`
""", table


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.plan)
    from edgeft.runtime import evaluate

    t0 = time.perf_counter()
    bundle_dir = ensure_bundle()
    run_dir = CACHE / ("run-quick" if args.quick else "run")
    bundle, enc_test, theta0, how, start_loss = make_plan(args, bundle_dir, run_dir)
    print(f"plan ready ({time.perf_counter() - t0:.0f} s): {args.steps} steps, start = {how}", flush=True)
    start_acc = evaluate(bundle, theta0, enc_test, 32)["accuracy"]

    rows = []
    for key in args.methods:
        name, passes = METHODS[key]
        print(f"running {name} ...", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", key, "--plan", str(run_dir)],
                       check=True)
        r = json.loads((run_dir / f"{key}.json").read_text())
        vectors = np.load(run_dir / f"{key}.npz")
        r["acc_final"] = evaluate(bundle, vectors["final"], enc_test, 32)["accuracy"]
        r["acc_wall"] = evaluate(bundle, vectors["wall"], enc_test, 32)["accuracy"] if r["wall_step"] else r["acc_final"]
        rows.append({**r, "key": key, "name": name, "passes": passes})

    report, table = render(args, rows, machine_facts([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                    how, start_acc, start_loss)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"\n{table}\n\nwritten to {args.out} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
