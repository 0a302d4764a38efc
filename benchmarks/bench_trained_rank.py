"""Ranks chosen while training (TRP, ``edgeft compress --trained-rank``) against post-hoc LoRD + the same
training budget, side by side per seed and energy.

    python benchmarks/bench_trained_rank.py --task rt --bundle MINILM_RT_BUNDLE [--energies 0.9,0.8,0.7] [--seeds 0,1,2]
    python benchmarks/bench_trained_rank.py --task shakespeare --bundle SMOLLM2_LM_BUNDLE --energies 0.97 --seeds 0

Lines, every one at the same training forward passes (--budget) with MeZO:

  fp32      the uncompressed bundle trained (the reference)
  lord@E    ``edgeft compress --energy E`` (post-hoc LoRD), then ``edgeft train`` for the budget
  trp@E     ``edgeft compress --trained-rank --energy E --folds 4``: four cuts of E^(1/4) each, a quarter of the
            budget trained after each, the LoRA folded into the layers between (--shrink 0.01, the default)
  trp-shrinkS@E   the same with --shrink S
  trp-max@E  kept from the first runs, when the soft threshold was a fraction of each layer's largest singular
             value (now: of the mean one); not re-runnable

Task rt: all-MiniLM-L6-v2 on Rotten Tomatoes, split as bench_learning.py's rt task (16 examples per label per seed,
200 dev snippets keep the best adapter, accuracy on 1,000 test snippets); plain SVD (LoRD barely costs MiniLM
accuracy without calibration, docs/DEPLOY.md). Task shakespeare: SmolLM2-135M causal LM, bench_learning.py's
windows (three tragedies to train, Romeo and Juliet to keep, perplexity on Macbeth); activation-aware SVD
calibrated on the first 64 training windows (plain SVD wrecks SmolLM2, docs/DEPLOY.md), so E is the energy
of the whitened weight. Per-run JSON in docs/trained-rank-runs/ as runs finish (--resume skips them); the
table goes to docs/TRAINED-RANK.md and the plot (parameters kept against the score) to docs/trained-rank-TASK.png.
Run seconds: trp's four cuts and training segments, lord's training (its LoRD bundle is made once per energy
and not counted), each + the test evaluation, with other benchmarks sharing the two cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import edgeft_json  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNS = DOCS / "trained-rank-runs"
FOLDS = 4


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("rt", "shakespeare"), default="rt")
    p.add_argument("--bundle", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-trained-rank"))
    p.add_argument("--energies", default="0.9,0.8,0.7")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=200, help="training forward passes per run")
    p.add_argument("--lines", default="fp32,lord,trp")
    p.add_argument("--shrink", type=float, default=0.01, help="trp's --shrink (other values: line trp-shrinkS)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--render-only", action="store_true")
    return p.parse_args(argv)




def prepare(args) -> dict:
    """bench_learning.py's data files for the same task (the same splits), plus a calibration file."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_learning import _cut, prepare as learning_prepare

    task = "rt" if args.task == "rt" else "shakespeare"
    files = learning_prepare(argparse.Namespace(task=task, work=args.work, bundle=args.bundle, dev_windows=16,
                                                test_tokens=8192))
    if args.task == "shakespeare":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
        text = json.loads(files["train"].read_text().splitlines()[0])["text"]
        files["calibrate"] = args.work / "calibrate.jsonl"
        files["calibrate"].write_text(json.dumps({"text": _cut(text, tok, 64 * 128)}) + "\n")
    return files


def _train_args(args, files, seed: int) -> list:
    common = ["--data", files["train"], "--eval-data", files["dev"], "--seed", seed, "--device", files["profile"],
              "--optimizer", "mezo", "--budget", f"{args.budget}fwd"]
    return common + (["--k-shot", 16, "--batch-size", 32] if args.task == "rt" else ["--batch-size", 4])


def _lord_bundle(args, files, energy: float) -> tuple[Path, dict]:
    """The post-hoc LoRD bundle at this energy (deterministic: made once, shared by the seeds)."""
    out = args.work / f"lord-{energy}"
    report_file = args.work / f"lord-{energy}.json"
    if not report_file.is_file():
        shutil.rmtree(out, ignore_errors=True)
        calibrate = ["--calibrate", files["calibrate"]] if "calibrate" in files else []
        report = edgeft_json("compress", args.bundle, "-o", out, "--energy", energy, *calibrate)
        report_file.write_text(json.dumps(report))
    return out, json.loads(report_file.read_text())


def run_one(args, files, line: str, energy: float | None, seed: int) -> dict:
    if line == "trp" and args.shrink != 0.01:
        line = f"trp-shrink{args.shrink:g}"
    name = line if energy is None else f"{line}@{energy}"
    out = RUNS / f"{args.task}-{name}-seed{seed}.json"
    if args.resume and out.is_file():
        return json.loads(out.read_text())
    started = time.perf_counter()
    run_dir = args.work / f"{name}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    compressed = None
    if line == "fp32":
        bundle, kept = args.bundle, 1.0
        summary = edgeft_json("train", bundle, "-o", run_dir, *_train_args(args, files, seed))
        adapter = run_dir / "adapter"
    elif line == "lord":
        bundle, compressed = _lord_bundle(args, files, energy)
        kept = compressed["kept"]
        summary = edgeft_json("train", bundle, "-o", run_dir, *_train_args(args, files, seed))
        adapter = run_dir / "adapter"
    else:
        calibrate = ["--calibrate", files["calibrate"]] if "calibrate" in files else []
        compressed = edgeft_json("compress", args.bundle, "-o", run_dir, "--trained-rank", "--energy", energy, "--folds", FOLDS,
                             "--shrink", args.shrink, *calibrate, *_train_args(args, files, seed))
        bundle, kept, summary, adapter = run_dir, compressed["kept"], compressed["training"], Path(compressed["adapter"])
    test = edgeft_json("eval", bundle, "--data", files["test"], "--adapter", adapter, "--device", files["profile"])
    record = {"task": args.task, "line": line, "energy": energy, "seed": seed, "budget_fwd": args.budget, "kept": kept,
              "linear_params": compressed["linear_params_after"] if compressed else None, "test": test,
              "ranks": {l["weight"]: l["rank"] for l in compressed["layers"] if l["compressed"]} if compressed else None,
              "folds": [{k: f[k] for k in ("fold", "kept", "training")} for f in compressed.get("folds", [])] if compressed else None,
              "train": {k: summary.get(k) for k in ("steps", "forward_passes", "best_step", "best", "elapsed_s")},
              "run_s": round(time.perf_counter() - started, 1)}
    RUNS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    metric = "perplexity" if "perplexity" in test else "accuracy"
    print(f"  done {args.task} {name} seed {seed}: kept {kept:.3f}, test {metric} {test[metric]:.4g} ({record['run_s']:.0f} s)",
          flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # bundles are large; the record keeps what is compared
    return record


def render(task: str) -> str | None:
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob(f"{task}-*.json"))]
    if not records:
        return None
    key = "perplexity" if task == "shakespeare" else "accuracy"
    fmt = (lambda v: f"{v:.2f}") if key == "perplexity" else (lambda v: f"{100 * v:.1f}%")
    by = {}
    for r in records:
        by.setdefault((r["line"], r["energy"]), {})[r["seed"]] = r
    rows = [f"| line | energy | seeds | linear params kept, median | test {key}, median (min–max) | run s, median |",
            "|---|---|---|---|---|---|"]
    for (line, energy), got in sorted(by.items(), key=lambda kv: (kv[0][1] or 2, kv[0][0])):
        values = [r["test"][key] for r in got.values()]
        rows.append(f"| {line} | {energy if energy is not None else '–'} | {','.join(map(str, sorted(got)))} | "
                    f"{statistics.median(r['kept'] for r in got.values()):.1%} | "
                    f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))}) | "
                    f"{statistics.median(r['run_s'] for r in got.values()):.0f} |")
    paired = []
    for (line, energy), got in sorted(by.items(), key=lambda kv: kv[0][1] or 2):
        other = by.get(("lord", energy))
        if not line.startswith("trp") or not other:
            continue
        for seed in sorted(set(got) & set(other)):
            a, b = got[seed], other[seed]
            diff = (f"{100 * (a['test'][key] / b['test'][key] - 1):+.1f}%" if key == "perplexity"
                    else f"{100 * (a['test'][key] - b['test'][key]):+.1f} points")
            paired.append(f"E {energy} seed {seed}: {line} {fmt(a['test'][key])} at {a['kept']:.1%} vs lord "
                          f"{fmt(b['test'][key])} at {b['kept']:.1%} ({diff})")
    _plot(task, by, key)
    return (f"## {task}\n\n`python benchmarks/bench_trained_rank.py --task {task} ...` — {records[0]['budget_fwd']} training "
            f"forward passes per run (MeZO).\n\n" + "\n".join(rows) + "\n\nPaired by energy and seed: "
            + ("; ".join(paired) if paired else "not yet measured") + f".\n\nPlot: `docs/trained-rank-{task}.png`.\n")


def _plot(task, by, key) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, line in enumerate(sorted({l for l, _ in by if l != "fp32"})):
        points = sorted((r["kept"], r["test"][key]) for (l, _), got in by.items() if l == line for r in got.values())
        if points:
            ax.scatter(*zip(*points), color=f"C{i}", label=line)
    reference = [r["test"][key] for (l, _), got in by.items() if l == "fp32" for r in got.values()]
    if reference:
        ax.axhline(statistics.median(reference), color="gray", ls="--", label="fp32 trained")
    ax.set_xlabel("linear-layer parameters kept")
    ax.set_ylabel(f"test {key}")
    if key == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"trained rank vs post-hoc LoRD, {task}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / f"trained-rank-{task}.png", dpi=120)
    plt.close(fig)


def render_all() -> None:
    sections = [s for s in (render(t) for t in ("rt", "shakespeare")) if s]
    text = "# Trained rank (TRP, forward-only) against post-hoc LoRD (issue 13)\n\n" + __doc__.split("\n\n", 1)[1] + "\n" + "\n".join(sections)
    notes = DOCS / "trained-rank-notes.md"  # the hand-written reading, kept across re-renders
    if notes.is_file():
        text += "\n" + notes.read_text()
    (DOCS / "TRAINED-RANK.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render_only:
        render_all()
        return
    if args.bundle is None:
        raise SystemExit("--bundle is required")
    args.work.mkdir(parents=True, exist_ok=True)
    files = prepare(args)
    lines = args.lines.split(",")
    for seed in (int(s) for s in args.seeds.split(",")):
        if "fp32" in lines:
            run_one(args, files, "fp32", None, seed)
        for energy in (float(e) for e in args.energies.split(",")):
            for line in ("lord", "trp"):
                if line in lines:
                    run_one(args, files, line, energy, seed)
        render_all()


if __name__ == "__main__":
    main()
