"""Optimizer benchmark: every forward-only optimizer, its DEFAULT settings, one budget of forward passes.

    python benchmarks/bench_optimizers.py                      # full run → docs/OPTIMIZERS.md + docs/optimizers-*.png
    python benchmarks/bench_optimizers.py --quick              # check run → benchmarks/.cache/optimizers/quick/
    python benchmarks/bench_optimizers.py --tasks rt --optimizers mezo,cma --seeds 0 --budget 600
    python benchmarks/bench_optimizers.py --tasks shakespeare --lm-optimizers mezo,zo-adam
    python benchmarks/bench_optimizers.py --render-only        # re-render the report from the saved runs
    python benchmarks/bench_optimizers.py --resume             # reuse finished runs made with the same settings
    python benchmarks/bench_optimizers.py --adapter loldu --no-backprop --tag loldu --out /tmp/loldu.md

Tasks (all few-shot, all from the same start point per seed):

  rt           all-MiniLM-L6-v2 classification, Rotten Tomatoes, k per class, linear-probe start
  20ng         all-MiniLM-L6-v2 classification, 20 Newsgroups (20 classes), k per class, linear-probe start
  shakespeare  SmolLM2-135M causal LM on windows of a few plays; perplexity on the first tokens of a
               held-out play (expensive: optional, own smaller budget, by default MeZO only)

Every optimizer in ``edgeft.runtime.optimizers.REGISTRY`` is built by ``make_optimizer`` with its
defaults (only seed, total_steps and steps_per_epoch are passed; ``--set`` overrides for experiments)
and driven through ``edgeft.runtime.Trainer`` until the training forward passes reach the budget.
The held-out test set is scored every ``--eval-every`` forward passes (those passes do not count).
MeZO is always run: it is the reference. Backprop LoRA + AdamW (peft) is the reference line for the
MiniLM tasks, counted as one forward pass per step (each step also takes one backward pass).

``--adapter SPEC`` exports another adapter type: ``KIND[:KEY=VALUE,...]`` with KIND an
``ExportOptions.adapter`` (lora, loldu, tt, bone) and the keys ``ExportOptions`` fields, e.g.
``lora:rank=2,alpha=4``, ``lora:init=pissa``, ``tt:rank=4,tt_cores=3``. Its bundles are cached under
their own folder name, and the spec is part of every run's settings (``--resume`` never mixes types).
The peft backprop line needs a plain LoRA (zero init): it is skipped for any other spec.

Process layout: the parent never imports numpy, torch or onnxruntime (Linux carries ru_maxrss across
fork+exec, so a child of a big parent would report the parent's peak). A "prep" subprocess per task
exports the bundle once (cached) and makes every seed's k-shot set, test set and start adapter; then
every (optimizer, seed) is its own subprocess, so its peak RSS is its own; ``--workers N`` runs N of
them at once, each with ``--threads`` intra-op threads (default: cores / workers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import machine_facts  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache" / "optimizers"
BUNDLES = CACHE / "bundles"  # exported once, reused by every run
RT_LABELS = ["rotten", "fresh"]  # label ids 0, 1
TEST_SEED = 1234  # the test subsets are fixed: the same examples for every seed and optimizer
DIVERGED_LOSS_RATIO = 1.5  # final test loss above this × the start's (or non-finite): diverged
REFERENCE = "mezo"
BACKPROP = "backprop"
TASK_TITLES = {
    "rt": "MiniLM-L6, Rotten Tomatoes",
    "20ng": "MiniLM-L6, 20 Newsgroups",
    "shakespeare": "SmolLM2-135M, Shakespeare (causal LM)",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="rt,20ng", help="comma-separated subset of: rt, 20ng, shakespeare")
    p.add_argument("--optimizers", help="comma-separated subset of the registry, or 'all' (default; mezo is always run)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (k-shot draw, LoRA init, optimizer)")
    p.add_argument("--budget", type=int, default=600, help="training forward passes per run (MiniLM tasks)")
    p.add_argument("--eval-every", type=int, default=100, help="score the test set every N forward passes")
    p.add_argument("--k", type=int, default=16, help="training examples per class (MiniLM tasks)")
    p.add_argument("--test-size", type=int, default=500, help="fixed held-out test subset (MiniLM tasks)")
    p.add_argument("--batch-size", type=int, default=32, help="MiniLM tasks (RT: the whole 32-example k-shot set)")
    p.add_argument("--lm-budget", type=int, default=200, help="training forward passes per run (shakespeare)")
    p.add_argument("--lm-eval-every", type=int, default=50)
    p.add_argument("--lm-optimizers", help="shakespeare's optimizers (default: mezo + those named by --optimizers)")
    p.add_argument("--lm-plays", default="tragedies/hamlet,tragedies/othello,tragedies/king-lear",
                   help="plays whose windows make the training pool")
    p.add_argument("--lm-test-play", default="tragedies/macbeth", help="held-out play")
    p.add_argument("--lm-test-tokens", type=int, default=2048, help="perplexity on this many first tokens of it")
    p.add_argument("--lm-windows", type=int, default=256, help="training windows drawn per seed from the pool")
    p.add_argument("--lm-max-length", type=int, default=128, help="window length (tokens) of the LM bundle")
    p.add_argument("--lm-batch-size", type=int, default=8)
    p.add_argument("--adapter", metavar="KIND[:KEY=VALUE,...]",
                   help="adapter type and export options (default: the exporter's LoRA r=8, like before)")
    p.add_argument("--no-backprop", action="store_true", help="skip the peft LoRA + AdamW reference line")
    p.add_argument("--backprop-steps", type=int, help="AdamW steps (default: --budget, one forward pass each)")
    p.add_argument("--adam-lr", type=float, default=1e-3, help="AdamW learning rate of the backprop reference")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                   help="override an optimizer setting (experiments only; repeatable; no NAME: all optimizers)")
    p.add_argument("--workers", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, help="intra-op threads per run (default: cores / workers)")
    p.add_argument("--tag", help="folder for this run set under benchmarks/.cache/optimizers (default: main/quick)")
    p.add_argument("--out", type=Path, help="report (default docs/OPTIMIZERS.md; --quick: in the cache); "
                                            "plots are written beside it")
    p.add_argument("--resume", action="store_true", help="keep finished runs whose settings and optimizer code match")
    p.add_argument("--render-only", action="store_true", help="only re-render the report from saved runs")
    p.add_argument("--quick", action="store_true",
                   help="check run: seed 0, mezo+zo-adam+cma, budget 40, 64 test examples, LM budget 8")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: names | prep:TASK | run:TASK:OPT:SEED | ...
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = "0"
        args.optimizers = args.optimizers or "mezo,zo-adam,cma"
        args.budget, args.eval_every, args.test_size = 40, 20, 64
        args.lm_budget, args.lm_eval_every, args.lm_windows, args.lm_test_tokens = 8, 4, 32, 256
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASK_TITLES]
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: {', '.join(TASK_TITLES)}")
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.workers = max(1, args.workers)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    args.tag = args.tag or ("quick" if args.quick else "main")
    args.out = args.out or (CACHE / args.tag / "OPTIMIZERS.md" if args.quick else REPO / "docs" / "OPTIMIZERS.md")
    try:
        args.overrides = parse_overrides(args.overrides)
        args.adapter = parse_adapter(args.adapter) if args.adapter else None
    except ValueError as err:
        p.error(str(err))
    return args


def parse_adapter(spec: str) -> dict:
    """'lora:rank=2,alpha=4' → {'adapter': 'lora', 'rank': 2, 'alpha': 4} (ExportOptions keywords)."""
    kind, _, rest = spec.partition(":")
    if not kind.strip():
        raise ValueError(f"--adapter {spec!r}: expected KIND[:KEY=VALUE,...]")
    options = {"adapter": kind.strip()}
    for item in filter(str.strip, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or key.strip() == "adapter":
            raise ValueError(f"--adapter {spec!r}: {item!r} is not KEY=VALUE")
        options[key.strip()] = parse_value(value.strip())
    return options


def adapter_slug(options: dict | None) -> str:
    """A file-name-safe, order-independent name of an adapter spec: 'lora-alpha4-rank2' ('' for the default)."""
    if not options:
        return ""
    return "-".join([options["adapter"]] + [f"{k}{v}" for k, v in sorted(options.items()) if k != "adapter"])


def adapter_text(options: dict) -> str:
    rest = ",".join(f"{k}={v}" for k, v in options.items() if k != "adapter")
    return options["adapter"] + (f":{rest}" if rest else "")


def backprop_possible(options: dict | None) -> bool:
    """bench_core's peft model is a plain LoRA over the unmodified base weights."""
    return not options or (options["adapter"] == "lora" and options.get("init", "zeros") == "zeros")


def parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(items: list[str]) -> dict:
    """['cma:popsize=10', 'lr=1e-3'] → {'cma': {'popsize': 10}, '*': {'lr': 0.001}}."""
    out: dict = {}
    for item in items:
        target, sep, rest = item.partition(":") if ":" in item.split("=", 1)[0] else ("*", "", item)
        key, eq, value = rest.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {item!r}: expected [NAME:]KEY=VALUE")
        out.setdefault(target.strip(), {})[key.strip()] = parse_value(value)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def source_hash(paths, extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def export_source_hash() -> str:
    """A cached bundle made by other export code is exported again."""
    return source_hash(sorted((REPO / "export").rglob("*.py")) + [REPO / "edgeft" / "manifest.py"])


def optimizer_source_hash() -> str:
    """Runs made with other optimizer or export code (other defaults, another bundle) are never reused
    by --resume."""
    return source_hash(sorted((REPO / "runtime" / "optimizers").glob("*.py")) + [REPO / "runtime" / "trainer.py"],
                       export_source_hash())


# --- workers (subprocesses): each imports what it needs ------------------------------------------


def _split_ids(flat, offsets) -> list:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _flat_ids(ids: list):
    import numpy as np

    offsets = np.cumsum([0] + [len(x) for x in ids]).astype(np.int64)
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)).astype(np.int64), offsets


def load_prep(run_dir: Path, task: str, seed: int):
    """(meta, arrays, train Encoded, test Encoded) of one task and seed, made by the prep worker."""
    import numpy as np

    from edgeft.runtime import Encoded

    meta = json.loads((run_dir / task / f"prep-seed{seed}.json").read_text())
    arrays = dict(np.load(run_dir / task / f"prep-seed{seed}.npz"))
    labelled = "train_labels" in arrays
    train = Encoded(_split_ids(arrays["train_ids"], arrays["train_offsets"]), arrays["train_labels"] if labelled else None)
    test = Encoded(_split_ids(arrays["test_ids"], arrays["test_offsets"]), arrays["test_labels"] if labelled else None)
    return meta, arrays, train, test


def export_once(task: str, cfg: dict) -> tuple[Path, str]:
    """The task's bundle (exported on first use) and the model folder it came from."""
    from edgeft import assets

    t = cfg["tasks"][task]
    adapter = dict(t.get("adapter") or {})
    if task == "shakespeare":
        gguf = assets.smollm2_gguf()
        source, name = str(gguf.parent), f"smollm2-lm{t['max_length']}"
    else:
        source, name = str(assets.minilm_folder()), f"minilm-{task}"
    if adapter:
        name += "-" + adapter_slug(adapter)
    folder = BUNDLES / name
    made_by = folder / "export-source-hash"
    if (folder / "edgeft.json").is_file() and (not made_by.is_file() or made_by.read_text() != export_source_hash()):
        shutil.rmtree(folder)  # exported by other code (run from the repo, not cached)
    if not (folder / "edgeft.json").is_file():
        import dataclasses

        from edgeft.export import ExportOptions, export_bundle

        known = {f.name for f in dataclasses.fields(ExportOptions)}
        unknown = sorted(set(adapter) - known)
        if unknown:
            raise SystemExit(f"--adapter: {', '.join(unknown)} not ExportOptions field(s) ({', '.join(sorted(known))})")
        print(f"    exporting {name} (first run only) ...", flush=True)
        started = time.perf_counter()
        if task == "shakespeare":
            options = ExportOptions(task="causal-lm", max_length=t["max_length"], gguf_file=gguf.name, **adapter)
        else:
            options = ExportOptions(task="classification", labels=t["labels"], max_length=128, **adapter)
        partial = folder.with_name(name + ".partial")  # a failed export never looks like a bundle
        shutil.rmtree(partial, ignore_errors=True)
        export_bundle(source, partial, options, log=lambda m: None)
        (partial / made_by.name).write_text(export_source_hash())
        partial.rename(folder)
        print(f"    exported in {time.perf_counter() - started:.0f} s", flush=True)
    return folder, source


def worker_names(cfg: dict, run_dir: Path) -> None:
    from edgeft.runtime import REGISTRY

    (run_dir / "registry.json").write_text(json.dumps(list(REGISTRY)))


def worker_prep(cfg: dict, run_dir: Path, task: str) -> None:
    """Export once; per seed: training set, fixed test set, start adapter, start metrics, backprop batches."""
    import math

    import numpy as np

    from edgeft import assets
    from edgeft.data import Dataset, k_shot
    from edgeft.runtime import Bundle, DeviceProfile, Encoded, MeZO, TrainConfig, Trainer, evaluate, starting_adapter

    t = cfg["tasks"][task]
    folder, source = export_once(task, cfg)
    bundle = Bundle(folder, DeviceProfile(name="bench-prep", threads=0))  # prep runs alone: all cores
    spec = bundle.manifest.adapter
    wanted = (t.get("adapter") or {}).get("adapter", "lora")
    if spec.kind != wanted:
        raise SystemExit(f"{folder}: holds a {spec.kind!r} adapter, not {wanted!r} (delete the folder)")
    trainable = sum(math.prod(x.shape) for x in spec.tensors if not x.role.startswith("head_"))
    out = run_dir / task
    out.mkdir(parents=True, exist_ok=True)
    if task == "shakespeare":
        plays = assets.shakespeare()
        pool = bundle.encode([plays[p] for p in t["plays"]])  # consecutive windows of max_length tokens
        test_windows = bundle.encode([plays[t["test_play"]]]).ids
        n_test = max(1, -(-t["test_tokens"] // bundle.max_length))
        test_all = Encoded(test_windows[:n_test], None)
    else:
        if task == "rt":
            texts, names = assets.rotten_tomatoes()
            ids = np.array([t["labels"].index(n) for n in names], dtype=np.int64)
            perm = np.random.default_rng(TEST_SEED).permutation(len(texts))
            test_rows, pool_rows = perm[: t["test_size"]], perm[t["test_size"] :]  # disjoint by construction
            pool_data = Dataset([texts[i] for i in pool_rows], ids[pool_rows])
            test_data = Dataset([texts[i] for i in test_rows], ids[test_rows])
        else:
            tr_texts, tr_names = assets.newsgroups("train")
            te_texts, te_names = assets.newsgroups("test")  # its own split: disjoint from training
            pool_data = Dataset(tr_texts, np.array([t["labels"].index(n) for n in tr_names], dtype=np.int64))
            rows = np.random.default_rng(TEST_SEED).permutation(len(te_texts))[: t["test_size"]]
            test_data = Dataset([te_texts[i] for i in rows], np.array([t["labels"].index(te_names[i]) for i in rows]))
        test_all = bundle.encode(test_data.texts, test_data.labels)
    for seed in cfg["seeds"]:
        if task == "shakespeare":
            rows = np.sort(np.random.default_rng([seed, 5]).permutation(len(pool))[: t["windows"]])
            train = Encoded([pool.ids[i] for i in rows], None)
        else:
            shots = k_shot(pool_data, t["k"], seed)
            train = bundle.encode(shots.texts, shots.labels)
        theta0, how = starting_adapter(bundle, train, seed)
        start = evaluate(bundle, theta0, test_all, t["eval_batch_size"])
        trainer = Trainer(bundle, train, MeZO(theta0), TrainConfig(batch_size=t["batch_size"], seed=seed))
        batches = np.array([trainer.batch_index(i) for i in range(t["backprop_steps"])], dtype=np.int64)
        tr_flat, tr_off = _flat_ids(train.ids)
        te_flat, te_off = _flat_ids(test_all.ids)
        arrays = {"theta0": theta0, "train_ids": tr_flat, "train_offsets": tr_off, "test_ids": te_flat,
                  "test_offsets": te_off, "batches": batches}
        if train.labels is not None:
            arrays.update(train_labels=np.asarray(train.labels, np.int64), test_labels=np.asarray(test_all.labels, np.int64))
        np.savez(out / f"prep-seed{seed}.npz", **arrays)
        meta = {"bundle": str(folder), "model": source, "how": how, "start": start, "n_train": len(train),
                "n_test": len(test_all), "pad_token_id": bundle.manifest.pad_token_id,
                "adapter_size": int(bundle.layout.size), "max_length": bundle.max_length,
                "adapter_kind": spec.kind, "trainable": int(trainable)}
        if test_all.labels is not None:
            meta["majority"] = float(np.bincount(test_all.labels).max() / len(test_all))
        else:
            meta["test_tokens"] = int(start["tokens"])
        (out / f"prep-seed{seed}.json").write_text(json.dumps(meta))
        print(f"    {task} seed {seed}: {len(train)} training {'windows' if task == 'shakespeare' else 'examples'}, "
              f"{len(test_all)} test; start {metric_text(task, start)} ({how})", flush=True)


def metric_text(task: str, metrics: dict) -> str:
    return f"perplexity {metrics['perplexity']:.2f}" if task == "shakespeare" else f"accuracy {metrics['accuracy']:.3f}"


def steps_for_budget(opt, budget: int) -> int:
    """How many steps the budget buys (the loop runs while forward passes < budget).

    Zeroth-order optimizers: 2·queries (+1 when conservative), queries read per step (AdaZeta's
    grow); population optimizers: popsize (Fireworks: about popsize). Only the lr schedule and
    AdaZeta's epoch count use total_steps; the run itself always stops on the budget.
    """
    config = getattr(opt, "config", None)
    if hasattr(opt, "queries") and config is not None:
        saved, step, passes = opt.step, 0, 0
        try:
            while passes < budget:
                opt.step = step
                passes += 2 * int(opt.queries()) + int(bool(getattr(config, "conservative", False)))
                step += 1
        finally:
            opt.step = saved
        return step
    per = int(getattr(config, "popsize", 0) or 1)
    return -(-budget // per)


def plan_optimizer(build, budget: int):
    """Build the optimizer with total_steps = the steps the budget buys (a fixed point for AdaZeta)."""
    total = max(1, budget // 2)
    for _ in range(20):
        opt = build(total)
        steps = max(1, steps_for_budget(opt, budget))
        if steps == total:
            break
        total = steps
    return build(total), total


def effective_config(opt) -> dict:
    from dataclasses import asdict, is_dataclass

    config = getattr(opt, "config", None)
    return asdict(config) if is_dataclass(config) else {}


def curve_point(task: str, passes: int, wall_s: float, step: int, metrics: dict) -> dict:
    point = {"fp": passes, "wall_s": round(wall_s, 3), "step": step, "loss": metrics["loss"]}
    point["value"] = metrics["perplexity"] if task == "shakespeare" else metrics["accuracy"]
    return point


def worker_run(cfg: dict, run_dir: Path, task: str, name: str, seed: int) -> None:
    """One optimizer, one seed: train until the forward-pass budget, scoring the test set on the way."""
    import math

    import numpy as np

    from edgeft.runtime import Bundle, DeviceProfile, TrainConfig, Trainer, make_optimizer

    started = time.perf_counter()
    t = cfg["tasks"][task]
    meta, arrays, train, test = load_prep(run_dir, task, seed)
    bundle = Bundle(meta["bundle"], DeviceProfile(name="bench", threads=cfg["threads"]))
    theta0 = arrays.pop("theta0")
    del arrays
    overrides = {**cfg["overrides"].get("*", {}), **cfg["overrides"].get(name, {})}
    spe = max(1, len(train) // t["batch_size"])
    budget, every = t["budget"], t["eval_every"]

    if overrides.get("projection") == "hidden":  # as edgeft train does: the base model's per-layer std
        from edgeft.runtime import layer_input_std

        overrides["layer_std"] = layer_input_std(bundle, train, t["batch_size"])

    def build(total):
        return make_optimizer(name, theta0, layout=bundle.layout, seed=seed, total_steps=total,
                              steps_per_epoch=spe, **overrides)

    opt, total = plan_optimizer(build, budget)
    config = effective_config(opt)
    ignored = [k for k in overrides if config and k not in config]
    overrides.pop("layer_std", None)  # measured, not set: the result's config holds it
    if ignored:
        raise SystemExit(f"--set {', '.join(ignored)}: not a setting of {name} (it has: {', '.join(config)})")
    trainer = Trainer(bundle, train, opt, TrainConfig(steps=total, batch_size=t["batch_size"],
                                                      eval_batch_size=t["eval_batch_size"], seed=seed), eval_set=test)
    rss_loaded = peak_rss_mb()
    ev = trainer.evaluator
    curve = [curve_point(task, 0, 0.0, 0, meta["start"])]  # the start, scored once by the prep worker
    per_step, losses, lrs, messages, skipped = [], [], [], [], 0
    next_eval, eval_s = every, 0.0
    cpu, load_start = 0.0, os.getloadavg()[0]
    while ev.forward_passes < budget:
        before, c0 = ev.forward_passes, time.process_time()
        report = trainer.step()
        cpu += time.process_time() - c0
        per_step.append(ev.forward_passes - before)
        losses.append(report.loss)
        lrs.append(report.lr)
        skipped += int(report.skipped)
        if report.message and len(messages) < 5:
            messages.append(report.message)
        if len(per_step) > 100 * budget:
            raise SystemExit(f"{name}: {len(per_step)} steps without reaching {budget} forward passes")
        if ev.forward_passes >= next_eval or ev.forward_passes >= budget:
            t0 = time.perf_counter()
            metrics = trainer.evaluate()
            eval_s += time.perf_counter() - t0
            curve.append(curve_point(task, ev.forward_passes, trainer.wall_s, opt.step, metrics))
            while next_eval <= ev.forward_passes:
                next_eval += every
    final = curve[-1]
    counts = {str(k): per_step.count(k) for k in sorted(set(per_step))}
    result = {
        "task": task, "optimizer": name, "seed": seed, "steps": opt.step, "planned_steps": total,
        "forward_passes": ev.forward_passes, "passes_per_step": counts, "train_wall_s": round(trainer.wall_s, 2),
        "eval_s": round(eval_s, 2), "elapsed_s": round(time.perf_counter() - started, 2),
        "s_per_forward": trainer.wall_s / max(1, ev.forward_passes), "cpu_s_per_forward": cpu / max(1, ev.forward_passes),
        "load": [load_start, os.getloadavg()[0]], "rss_loaded_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "curve": curve, "start_loss": curve[0]["loss"],
        "final_loss": final["loss"], "skipped_steps": skipped, "messages": messages,
        "lr_reported": {"first": lrs[0], "max": max(lrs), "last": lrs[-1]} if lrs else None,
        "train_losses": [x if math.isfinite(x) else None for x in losses], "config": config, "overrides": overrides,
        "threads": cfg["threads"], "key": cfg["keys"][f"{task}:{name}:{seed}"],
        "adapter": {"kind": meta.get("adapter_kind", "lora"), "size": meta["adapter_size"],
                    "trainable": meta.get("trainable")},
    }
    write_result(run_dir, result)


def write_result(run_dir: Path, result: dict) -> None:
    path = run_dir / result["task"] / result["optimizer"] / f"seed{result['seed']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


class BatchPlan:
    """What bench_core.torch_model reads (theta0, ids{i}, mask{i}, labels{i}), padded on demand from prep."""

    def __init__(self, arrays: dict, pad_id: int):
        self.arrays, self.pad_id, self._step, self._feeds = arrays, pad_id, None, None
        self.train = _split_ids(arrays["train_ids"], arrays["train_offsets"])

    def __getitem__(self, key: str):
        import numpy as np

        if key == "theta0":
            return self.arrays["theta0"]
        for prefix in ("labels", "mask", "ids"):
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                step = int(key[len(prefix):])
                if step != self._step:
                    index = self.arrays["batches"][step]
                    rows = [self.train[i] for i in index]
                    width = max(len(r) for r in rows)
                    ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
                    mask = np.zeros((len(rows), width), dtype=np.int64)
                    for r, row in enumerate(rows):
                        ids[r, : len(row)], mask[r, : len(row)] = row, 1
                    self._step = step
                    self._feeds = {"ids": ids, "mask": mask, "labels": self.arrays["train_labels"][index]}
                return self._feeds[prefix]
        raise KeyError(key)


def worker_backprop(cfg: dict, run_dir: Path, task: str, seed: int) -> None:
    """peft LoRA + AdamW on the same k-shot set, batches and start; adapter snapshots at the eval points.

    The torch model is bench_core's (LoRA via peft, head in the bundle's layout). Never imports
    onnxruntime: the snapshots are scored by the "score" worker, so this peak RSS is torch training only.
    """
    import numpy as np
    import torch

    from bench_core import torch_model

    t = cfg["tasks"][task]
    meta = json.loads((run_dir / task / f"prep-seed{seed}.json").read_text())
    arrays = dict(np.load(run_dir / task / f"prep-seed{seed}.npz"))
    torch.manual_seed(seed)
    params, loss_fn, vector, start_loss = torch_model(
        {"threads": cfg["threads"], "bundle": meta["bundle"], "model": meta["model"]}, BatchPlan(arrays, meta["pad_token_id"]))
    opt = torch.optim.AdamW(params, lr=cfg["adam_lr"], weight_decay=0.0)
    rss_loaded = peak_rss_mb()
    steps, every = t["backprop_steps"], t["eval_every"]
    wall, cpu, losses, snapshots, walls = 0.0, 0.0, [], {}, {}
    load_start = os.getloadavg()[0]
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(i)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        if (i + 1) % every == 0 or i + 1 == steps:
            snapshots[f"step{i + 1}"], walls[i + 1] = vector(), wall
    np.savez(run_dir / task / f"backprop-seed{seed}.npz", **snapshots)
    (run_dir / task / f"backprop-seed{seed}.train.json").write_text(json.dumps({
        "steps": steps, "train_wall_s": round(wall, 2), "walls": walls, "train_losses": losses,
        "rss_loaded_mb": round(rss_loaded, 1), "peak_rss_mb": round(peak_rss_mb(), 1), "torch_start_loss": start_loss,
        "s_per_step": wall / max(1, steps), "cpu_s_per_step": cpu / max(1, steps),
        "load": [load_start, os.getloadavg()[0]]}))


def worker_score(cfg: dict, run_dir: Path, task: str, seed: int) -> None:
    """Score the backprop snapshots with edgeft's evaluate (ONNX Runtime), like every other curve."""
    import numpy as np

    from edgeft.runtime import Bundle, DeviceProfile, evaluate

    t = cfg["tasks"][task]
    meta, _, _, test = load_prep(run_dir, task, seed)
    bundle = Bundle(meta["bundle"], DeviceProfile(name="bench", threads=cfg["threads"]))
    trained = json.loads((run_dir / task / f"backprop-seed{seed}.train.json").read_text())
    snapshots = np.load(run_dir / task / f"backprop-seed{seed}.npz")
    curve = [curve_point(task, 0, 0.0, 0, meta["start"])]
    for step_text, wall in sorted(trained["walls"].items(), key=lambda kv: int(kv[0])):
        step = int(step_text)
        metrics = evaluate(bundle, snapshots[f"step{step}"], test, t["eval_batch_size"])
        curve.append(curve_point(task, step, wall, step, metrics))
    result = {
        "task": task, "optimizer": BACKPROP, "seed": seed, "steps": trained["steps"], "forward_passes": trained["steps"],
        "passes_per_step": {"1": trained["steps"]}, "train_wall_s": trained["train_wall_s"],
        "s_per_forward": trained["s_per_step"], "cpu_s_per_forward": trained["cpu_s_per_step"],
        "load": trained["load"], "rss_loaded_mb": trained["rss_loaded_mb"],
        "peak_rss_mb": trained["peak_rss_mb"], "curve": curve, "start_loss": curve[0]["loss"],
        "final_loss": curve[-1]["loss"], "train_losses": trained["train_losses"],
        "config": {"lr": cfg["adam_lr"], "weight_decay": 0.0, "betas": [0.9, 0.999]}, "overrides": {},
        "threads": cfg["threads"], "key": cfg["keys"][f"{task}:{BACKPROP}:{seed}"],
    }
    write_result(run_dir, result)


def run_worker(spec: str, run_dir: Path) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())
    kind, *rest = spec.split(":")
    if kind == "names":
        return worker_names(cfg, run_dir)
    if kind == "prep":
        return worker_prep(cfg, run_dir, rest[0])
    if kind == "run":
        return worker_run(cfg, run_dir, rest[0], rest[1], int(rest[2]))
    if kind == "backprop":
        return worker_backprop(cfg, run_dir, rest[0], int(rest[1]))
    if kind == "score":
        return worker_score(cfg, run_dir, rest[0], int(rest[1]))
    raise SystemExit(f"unknown worker {spec!r}")


# --- parent: plan, spawn, collect ------------------------------------------------------------


def task_settings(args, task: str) -> dict:
    if task == "shakespeare":
        t = {"budget": args.lm_budget, "eval_every": args.lm_eval_every, "batch_size": args.lm_batch_size,
             "eval_batch_size": args.lm_batch_size, "plays": [p.strip() for p in args.lm_plays.split(",")],
             "test_play": args.lm_test_play, "test_tokens": args.lm_test_tokens, "windows": args.lm_windows,
             "max_length": args.lm_max_length, "backprop_steps": 0, "backprop": False, "metric": "perplexity"}
    else:
        labels = RT_LABELS if task == "rt" else None  # 20ng: filled in from the data by the parent's caller
        backprop = not args.no_backprop and backprop_possible(args.adapter)
        t = {"budget": args.budget, "eval_every": args.eval_every, "batch_size": args.batch_size,
             "eval_batch_size": 32, "k": args.k, "test_size": args.test_size, "labels": labels,
             "backprop_steps": (args.backprop_steps or args.budget) if backprop else 0,
             "backprop": backprop, "metric": "accuracy"}
        if args.adapter and not args.no_backprop and not backprop:
            t["backprop_skipped"] = True
    if args.adapter:  # only then: the run keys of default runs stay what they were
        t["adapter"] = args.adapter
    return t


def newsgroup_labels() -> list[str]:
    """The 20 class names, read without numpy (the parent stays small)."""
    code = "import json; from edgeft.assets import newsgroups; print(json.dumps(sorted(set(newsgroups('train')[1]))))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return run_worker(args.worker, args.run_dir)
    run_dir = CACHE / args.tag
    if args.render_only:
        cfg = json.loads((run_dir / "config.json").read_text())
        return finish(cfg, run_dir, args.out, failed=[])
    t0 = time.perf_counter()
    facts = machine_facts(("onnxruntime", "torch", "transformers", "peft", "cma", "numpy"))  # load before our work
    run_dir.mkdir(parents=True, exist_ok=True)
    (CACHE.parent / ".gitignore").write_text("*\n")  # keep bundles and runs out of git (as bench_core does)
    env = {**os.environ, **{k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    def spawn(spec: str, capture: Path | None = None) -> int:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--run-dir", str(run_dir)]
        if capture is None:
            return subprocess.run(cmd, env=env).returncode
        capture.parent.mkdir(parents=True, exist_ok=True)
        with open(capture, "w") as f:
            return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode

    # config first: the "names" worker reads it
    cfg = {"seeds": args.seeds, "threads": args.threads, "workers": args.workers, "adam_lr": args.adam_lr,
           "overrides": args.overrides, "quick": args.quick, "facts": facts, "tasks": {}, "keys": {},
           "source_hash": optimizer_source_hash()}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    if spawn("names") != 0:
        raise SystemExit("could not read the optimizer registry")
    registry = json.loads((run_dir / "registry.json").read_text())
    chosen = [o.strip() for o in args.optimizers.split(",")] if args.optimizers not in (None, "all") else list(registry)
    unknown = [o for o in chosen + [o.strip() for o in (args.lm_optimizers or "").split(",") if o.strip()]
               + [o for o in args.overrides if o != "*"] if o not in registry]
    if unknown:
        raise SystemExit(f"unknown optimizer(s) {unknown}; the registry has: {', '.join(registry)}")
    for task in args.tasks:
        t = task_settings(args, task)
        if task == "20ng":
            t["labels"] = newsgroup_labels()
        if task == "shakespeare":
            names = [o.strip() for o in args.lm_optimizers.split(",")] if args.lm_optimizers else \
                (chosen if args.optimizers and not args.quick else [REFERENCE])
        else:
            names = chosen
        t["optimizers"] = [REFERENCE] + [o for o in registry if o in names and o != REFERENCE]
        cfg["tasks"][task] = t
    cfg["registry"] = registry
    jobs = []  # (label, [worker specs run in order])
    for task, t in cfg["tasks"].items():
        shared = {k: v for k, v in t.items() if k != "optimizers"}
        for seed in args.seeds:
            for name in t["optimizers"] + ([BACKPROP] if t["backprop"] else []):
                extra = {"adam_lr": args.adam_lr} if name == BACKPROP else \
                    {**args.overrides.get("*", {}), **args.overrides.get(name, {})}
                key = hashlib.sha1(json.dumps([shared, name, seed, extra, args.threads, cfg["source_hash"]],
                                              sort_keys=True).encode()).hexdigest()[:16]
                cfg["keys"][f"{task}:{name}:{seed}"] = key
                result = run_dir / task / name / f"seed{seed}.json"
                if args.resume and result.is_file() and json.loads(result.read_text()).get("key") == key:
                    continue
                result.unlink(missing_ok=True)
                specs = [f"backprop:{task}:{seed}", f"score:{task}:{seed}"] if name == BACKPROP else \
                    [f"run:{task}:{name}:{seed}"]
                jobs.append((f"{task}/{name}/seed{seed}", specs))
    (run_dir / "config.json").write_text(json.dumps(cfg))

    for task in cfg["tasks"]:
        if not any(label.startswith(task + "/") for label, _ in jobs):
            log(f"{task}: every run is cached (--resume)")
            continue
        log(f"prep {task}: bundle, {len(args.seeds)} seed(s) of training/test sets and start adapters")
        if spawn(f"prep:{task}") != 0:
            raise SystemExit(f"prep {task} failed")

    # the expensive tasks first, so that the pool ends with short runs
    order = {"shakespeare": 0, "20ng": 1, "rt": 2}
    jobs.sort(key=lambda j: order.get(j[0].split("/")[0], 3))
    log(f"{len(jobs)} run(s), {args.workers} at a time, {args.threads} intra-op thread(s) each")
    failed = []

    def do(job):
        label, specs = job
        started = time.perf_counter()
        for spec in specs:
            if spawn(spec, run_dir / "logs" / (spec.replace(":", "_") + ".log")) != 0:
                failed.append(label)
                log(f"FAILED {label} ({spec}); log: {run_dir / 'logs' / (spec.replace(':', '_') + '.log')}")
                return
        task, name, seed = label.split("/")
        r = json.loads((run_dir / task / name / f"{seed}.json").read_text())
        last = r["curve"][-1]
        log(f"done {label}: {last['fp']} fwd, {'ppl' if task == 'shakespeare' else 'acc'} "
            f"{r['curve'][0]['value']:.3f} → {last['value']:.3f}, {r['train_wall_s']:.0f} s training, "
            f"{time.perf_counter() - started:.0f} s in all, peak RSS {r['peak_rss_mb']:.0f} MB")

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(do, jobs))
    finish(cfg, run_dir, args.out, failed)
    log(f"finished; report {args.out}")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}")


# --- report -------------------------------------------------------------------------------


def load_results(cfg: dict, run_dir: Path) -> dict:
    """{task: {optimizer: [result per seed]}} for the runs of this configuration (keys must match)."""
    out = {}
    for task, t in cfg["tasks"].items():
        out[task] = {}
        for name in t["optimizers"] + ([BACKPROP] if t["backprop"] else []):
            runs = []
            for seed in cfg["seeds"]:
                path = run_dir / task / name / f"seed{seed}.json"
                if path.is_file():
                    r = json.loads(path.read_text())
                    if r.get("key") == cfg["keys"].get(f"{task}:{name}:{seed}"):
                        runs.append(r)
            out[task][name] = runs
    return out


def seeds_missing(cfg: dict, results: dict) -> str:
    """A note when some planned runs have no result (a run stopped early, rendered with --render-only)."""
    planned = sum(len(runs) for task in results.values() for runs in [cfg["seeds"]] * len(task))
    done = sum(len(runs) for task in results.values() for runs in task.values())
    return "" if done == planned else f"; **{done} of {planned} planned runs have results** (the tables say which)"


def first_reach(curve: list[dict], target: float, higher: bool):
    for point in curve:
        if (point["value"] >= target - 1e-12) if higher else (point["value"] <= target + 1e-12):
            return point
    return None


def is_diverged(r: dict) -> bool:
    import math

    loss = r["final_loss"]
    return loss is None or not math.isfinite(loss) or loss > DIVERGED_LOSS_RATIO * r["start_loss"]


def mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def fmt_passes(counts: dict) -> str:
    values = sorted(int(k) for k in counts)
    if len(values) == 1:
        return str(values[0])
    total, steps = sum(int(k) * c for k, c in counts.items()), sum(counts.values())
    return f"{values[0]}–{values[-1]} (mean {total / steps:.1f})"


def mean_curve(runs: list[dict]) -> tuple[list[float], list[float]]:
    """Mean over seeds, point by point (every seed of one optimizer evaluates at the same passes)."""
    n = min(len(r["curve"]) for r in runs)
    xs = [statistics.mean(r["curve"][i]["fp"] for r in runs) for i in range(n)]
    ys = [statistics.mean(r["curve"][i]["value"] for r in runs) for i in range(n)]
    return xs, ys


def task_section(cfg: dict, task: str, results: dict, plot_name: str | None) -> tuple[str, dict]:
    """Markdown for one task, and its verdict facts."""
    t = cfg["tasks"][task]
    higher = task != "shakespeare"
    metric = "accuracy" if higher else "perplexity"
    digits = 3 if higher else 2
    ref = results.get(REFERENCE, [])
    verdict = {"task": task, "met": None}
    target = statistics.mean(r["curve"][-1]["value"] for r in ref) if ref else None
    ref_passes = statistics.mean(r["forward_passes"] for r in ref) if ref else None
    start = statistics.mean(r["curve"][0]["value"] for r in ref) if ref else None
    head = ["optimizer", "fwd / step", f"final {metric}", "start", "best on curve" + ("" if higher else " (lowest)"),
            "fwd to MeZO's final (median; seeds)", "train s to it (median)", "s / fwd", "CPU s / fwd",
            "peak RSS MB (median)",
            "diverged seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reach_by_opt = {}
    diverged = []
    for name, runs in results.items():
        label = "backprop LoRA + AdamW (peft) †" if name == BACKPROP else f"`{name}`"
        if not runs:
            lines.append(f"| {label} | failed or not run | " + " | ".join([""] * (len(head) - 2)) + " |")
            continue
        finals = [r["curve"][-1]["value"] for r in runs]
        starts = [r["curve"][0]["value"] for r in runs]
        bests = [(max if higher else min)(p["value"] for p in r["curve"]) for r in runs]
        reach_cell, wall_cell = "–", "–"
        if target is not None:
            hits = [first_reach(r["curve"], target, higher) for r in runs]
            reached = [h for h in hits if h is not None]
            if len(reached) * 2 > len(runs):  # a majority of seeds reached it: the median is finite
                inf = float("inf")
                med_fp = statistics.median([h["fp"] if h else inf for h in hits])
                med_wall = statistics.median([h["wall_s"] if h else inf for h in hits])
                reach_cell, wall_cell = f"{med_fp:.0f} ({len(reached)}/{len(runs)})", f"{med_wall:.0f}"
                if name != BACKPROP:
                    reach_by_opt[name] = med_fp
            else:
                reach_cell = f"not reached ({len(reached)}/{len(runs)})"
        bad = [r["seed"] for r in runs if is_diverged(r)]
        if bad and name != BACKPROP:
            diverged.append(f"`{name}` (seed{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))})")
        cells = [label, "1 fwd + 1 bwd" if name == BACKPROP else fmt_passes(runs[0]["passes_per_step"]),
                 mean_std(finals, digits), mean_std(starts, digits), mean_std(bests, digits), reach_cell, wall_cell,
                 f"{statistics.median(r['s_per_forward'] for r in runs):.3f}",
                 f"{statistics.median(r['cpu_s_per_forward'] for r in runs):.3f}" if all("cpu_s_per_forward" in r for r in runs) else "–",
                 f"{statistics.median(r['peak_rss_mb'] for r in runs):.0f}",
                 f"{len(bad)}/{len(runs)}"]
        lines.append("| " + " | ".join(cells) + " |")

    # verdict
    notes = []
    if target is None:
        notes.append("**Verdict: no MeZO runs, no reference.**")
    else:
        limit = ref_passes / 3
        contenders = {k: v for k, v in reach_by_opt.items() if k != REFERENCE}
        better = (target > start) if higher else (target < start)
        if contenders:
            best_name = min(contenders, key=contenders.get)
            best_fp = contenders[best_name]
            met = best_fp <= limit
            verdict.update(met=met, best=best_name, best_fp=best_fp, limit=limit)
            notes.append(f"MeZO's final mean {metric}: {target:.{digits}f} after {ref_passes:.0f} forward passes "
                         f"(start {start:.{digits}f}). Best: `{best_name}` reaches it in {best_fp:.0f} forward passes "
                         f"(median over seeds); target ≤ {limit:.0f} (1/3 of MeZO's): "
                         f"**{'met' if met else 'not met'}**.")
        else:
            verdict.update(met=False)
            notes.append(f"MeZO's final mean {metric}: {target:.{digits}f} after {ref_passes:.0f} forward passes "
                         f"(start {start:.{digits}f}). No other optimizer reached it on a majority of seeds: "
                         "**target not met**.")
        if not better:
            verdict["vacuous"] = True
            notes.append(f"Caution: MeZO ended no better than the start on average, so every optimizer \"reaches\" MeZO's "
                         f"final {metric} at 0 forward passes (the start): the target says nothing here.")
    verdict["diverged"] = diverged
    notes.append("Diverged (final test loss > 1.5 × start, or non-finite): " + (", ".join(diverged) if diverged else "none") + ".")
    loads = [x for runs in results.values() for r in runs for x in r.get("load", [])]
    if loads:
        notes.append(f"Machine load during these runs (1-min load average at each run's start and end): median "
                     f"{statistics.median(loads):.1f}, max {max(loads):.1f}, on {cfg['facts']['cores']} cores"
                     + (" — other work shared the CPU, so wall times are inflated; CPU s / fwd is the better guide."
                        if statistics.median(loads) > (cfg['facts']['cores'] or 1) + 0.5 else "."))
    t_desc = (f"{t['windows']} training windows of {t['max_length']} tokens per seed from {', '.join(t['plays'])}; "
              f"perplexity on the first {t['test_tokens']} tokens of {t['test_play']}; batch {t['batch_size']}"
              if task == "shakespeare" else
              f"k = {t['k']} per class (seeded draw per seed), batch {t['batch_size']}, fixed test subset of "
              f"{t['test_size']} examples disjoint from training")
    text = [f"## {TASK_TITLES[task]}", "",
            f"{t_desc}; budget {t['budget']} training forward passes, test scored every {t['eval_every']}.", "",
            "\n".join(lines), "", *[f"- {n}" for n in notes]]
    if plot_name:
        text += ["", f"![{metric} against forward passes]({plot_name})"]
    return "\n".join(text) + "\n", verdict


def plot_task(cfg: dict, task: str, results: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    higher = task != "shakespeare"
    fig, ax = plt.subplots(figsize=(9, 5.2))
    colours = plt.get_cmap("tab20")
    names = [n for n in results if n not in (REFERENCE, BACKPROP) and results[n]]
    drawn = False
    for i, name in enumerate(names):
        xs, ys = mean_curve(results[name])
        ax.plot(xs, ys, marker=".", lw=1.2, color=colours(i % 20), label=name, zorder=3)
        drawn = True
    if results.get(REFERENCE):
        xs, ys = mean_curve(results[REFERENCE])
        ax.plot(xs, ys, marker="o", lw=2.4, color="black", label=f"{REFERENCE} (reference)", zorder=2)
        ax.axhline(ys[-1], color="black", lw=0.8, ls=":")
        drawn = True
    if results.get(BACKPROP):
        xs, ys = mean_curve(results[BACKPROP])
        ax.plot(xs, ys, lw=1.8, ls="--", color="grey", label="backprop LoRA+AdamW (steps)")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    seeds = len(cfg["seeds"])
    smoke = "SMOKE RUN (--quick): these numbers mean nothing" if cfg.get("quick") else ""
    ax.set_title(f"{smoke + chr(10) if smoke else ''}{TASK_TITLES[task]}: mean of {seeds} seed{'s' if seeds > 1 else ''}, default settings",
                 fontsize=10)
    ax.set_xlabel("training forward passes" + (" (backprop: steps, each also one backward pass)" if results.get(BACKPROP) else ""))
    ax.set_ylabel("test accuracy" if higher else "test perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def settings_list(cfg: dict, all_results: dict) -> str:
    """The settings each optimizer actually ran with (as recorded by its runs)."""
    seen, lines = {}, []
    for task_results in all_results.values():
        for name, runs in task_results.items():
            if runs and name not in seen:
                seen[name] = {k: v for k, v in runs[0]["config"].items() if k not in ("seed", "total_steps", "steps_per_epoch")}
    for name, config in seen.items():
        extra = cfg["overrides"].get(name, {}) or {}
        shown = ", ".join(f"{k}={v}" for k, v in config.items())
        lines.append(f"- `{name}`: {shown}" + (f" (overridden: {extra})" if extra else ""))
    return "\n".join(lines)


def finish(cfg: dict, run_dir: Path, out: Path, failed: list[str]) -> None:
    results = load_results(cfg, run_dir)
    sections, verdicts, tables = [], [], []
    for task in cfg["tasks"]:
        plot = out.parent / f"optimizers-{task}.png"
        made = plot_task(cfg, task, results[task], plot)
        section, verdict = task_section(cfg, task, results[task], plot.name if made else None)
        sections.append(section)
        verdicts.append(verdict)
    (run_dir / "results.json").write_text(json.dumps(results))  # everything the report is made of, in one file
    facts = cfg["facts"]
    met = [v["task"] for v in verdicts if v.get("met")]
    vacuous = [v["task"] for v in verdicts if v.get("met") and v.get("vacuous")]
    any_div = [f"{v['task']}: {', '.join(v['diverged'])}" for v in verdicts if v["diverged"]]
    summary = (f"- Target 1 (best optimizer reaches MeZO's final accuracy/perplexity with ≤ 1/3 of MeZO's forward "
               f"passes, every task): **{'met' if len(met) == len(verdicts) else 'not met'}** "
               f"({len(met)}/{len(verdicts)} tasks: {', '.join(met) or 'none'})"
               + (f"; **vacuously** on {', '.join(vacuous)}: MeZO ended no better than the start there" if vacuous else "")
               + ".\n"
               f"- Target 2 (no optimizer diverges with its defaults on any seed): "
               f"**{'met' if not any_div else 'not met'}**" + (f" ({'; '.join(any_div)})" if any_div else "") + ".")
    smoke = ("> **SMOKE RUN (`--quick`): tiny budget, one seed, a few optimizers, a small test set. These numbers "
             "only show that the script works end to end; they say nothing about the optimizers.**\n\n"
             if cfg.get("quick") else "")
    failed_note = f"\n**Failed runs** (see `benchmarks/.cache/optimizers/{run_dir.name}/logs/`): {', '.join(failed)}\n" if failed else ""
    workers, threads = cfg["workers"], cfg["threads"]
    adapter = next((t["adapter"] for t in cfg["tasks"].values() if t.get("adapter")), None)
    start_text = (f"adapter `{adapter_text(adapter)}` at its zero-update start" if adapter else "LoRA r=8 at PEFT's init")
    if any(t.get("backprop_skipped") for t in cfg["tasks"].values()):
        failed_note += (f"\nThe backprop reference was **skipped**: bench_core's peft model is a plain LoRA "
                        f"(zero init), not `{adapter_text(adapter)}`.\n")
    report = f"""# Optimizers: forward passes to reach MeZO, default settings

{smoke}Every optimizer of `edgeft.runtime.optimizers.REGISTRY`, built by `make_optimizer` with its **default settings**
(only `seed`, `total_steps` and `steps_per_epoch` are passed), trained through `edgeft.runtime.Trainer` from the
same start per seed ({start_text}; MiniLM tasks: + a linear-probe head fitted on the k-shot set)
until its training forward passes reach the budget. Seeds: {', '.join(map(str, cfg['seeds']))} (each draws the
k-shot set, the LoRA init and the optimizer's randomness){seeds_missing(cfg, results)}. Made by `benchmarks/bench_optimizers.py`.

{summary}
{failed_note}
{chr(10).join(sections)}
## How it is counted

- **Forward passes**: training forward passes only (`trainer.evaluator.forward_passes`), each one batch. The
  last step may pass the budget (a step is never cut). Test-set scoring does not count.
- **fwd / step**: measured; a range when it varies (AdaZeta's query count grows per epoch).
- **fwd to MeZO's final**: the first test-set evaluation (every `eval-every` passes, and the start at 0) at which a
  seed's accuracy is ≥ MeZO's final mean over seeds (perplexity: ≤); median over seeds, with
  how many seeds reached it; "not reached" when fewer than half did. The target compares the best optimizer's
  median with a third of MeZO's total forward passes (its budget). Resolution: the evaluation interval.
- **train s to it**: training time of that run up to that evaluation (evaluations excluded), median over seeds.
- **s / fwd**: training time per forward pass (optimizer overhead included). Runs went {workers} at a time with
  {threads} intra-op thread{'s' if threads > 1 else ''} each (ONNX Runtime, torch and BLAS alike), so times are
  per run with {threads} thread{'s' if threads > 1 else ''} and only comparable within this report. **CPU s / fwd**:
  the process's CPU time per forward pass, which other work on the machine inflates far less than wall time
  (with one thread and an idle machine the two agree); use it to size runs.
- **peak RSS**: `ru_maxrss` of the run's own process (bundle load, training and the test-set scoring it does).
- **diverged**: final test loss > {DIVERGED_LOSS_RATIO} × the start's, or non-finite. Runs are raw: the Trainer's
  keep-best and divergence roll-back (used by `edgeft train`) are not in the loop, the final adapter is scored.
- † **backprop** (reference line, not a contender): peft LoRA (same rank, targets and start) + the head, AdamW lr
  {cfg['adam_lr']:g}, weight decay 0, on the same batches; one step = one forward + one backward pass and is
  counted as **one** forward pass, so it is plotted against steps (its time columns are per step). Its adapters are scored with the same
  ONNX Runtime evaluation; its peak RSS is torch training only (scoring runs in another process).
  Not run for Shakespeare (MiniLM tasks only).
- Raw per-run results: `benchmarks/.cache/optimizers/{run_dir.name}/results.json` (re-render with `--render-only`).

## Settings each optimizer ran with

{settings_list(cfg, results)}

## Machine

- CPU: {facts['cpu']}, {facts['cores']} cores; load average at the start: {", ".join(f"{x:.1f}" for x in facts['load'])}
- Python {facts['python']}, onnxruntime {facts['onnxruntime']}, torch {facts['torch']}, transformers {facts['transformers']},
  peft {facts['peft']}, cma {facts['cma']}, numpy {facts['numpy']}
- Started: {facts['date']}
- Command: `{facts['command']}`
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():  # a hand-written scope note (under the title) and bench_adapters' section survive
        old = out.read_text()
        scope = marked_section(old, SCOPE)
        if scope:
            title, _, rest = report.partition("\n\n")
            report = f"{title}\n\n{scope}\n\n{rest}"
        kept = marked_section(old)
        report = with_marked_section(report, kept) if kept else report
    out.write_text(report)
    print("\n" + summary + "\n\n" + "\n".join(s.split("\n\n", 2)[-1] for s in sections))
    print(f"written to {out}")


ADAPTERS_BEGIN, ADAPTERS_END = "<!-- adapters:begin -->", "<!-- adapters:end -->"  # bench_adapters.py's section
ADAPTERS, SCOPE = (ADAPTERS_BEGIN, ADAPTERS_END), ("<!-- scope:begin -->", "<!-- scope:end -->")  # scope: by hand


def marked_section(text: str, markers=ADAPTERS) -> str | None:
    """The section between ``markers`` (default: the adapters section), markers included (None when absent)."""
    begin, end = markers
    i = text.find(begin)
    j = text.find(end, i + 1)
    return text[i : j + len(end)] if i >= 0 and j >= 0 else None


def with_marked_section(text: str, section: str) -> str:
    """``text`` with its adapters section replaced by ``section`` (appended when it has none)."""
    old = marked_section(text)
    return text.replace(old, section) if old else text.rstrip("\n") + "\n\n" + section + "\n"


if __name__ == "__main__":
    main()
