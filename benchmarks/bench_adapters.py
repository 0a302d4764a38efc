"""Adapter-type benchmark (issue 5): trainable parameters and accuracy after one forward-pass budget.

    python benchmarks/bench_adapters.py                 # full run → section in docs/OPTIMIZERS.md + docs/adapters-accuracy.png
    python benchmarks/bench_adapters.py --quick         # check run (lora r=8, r=2; seed 0; 20 passes) → benchmarks/.cache/optimizers/adapters-quick/
    python benchmarks/bench_adapters.py --resume        # keep the finished runs of the same settings
    python benchmarks/bench_adapters.py --render-only   # re-render the section from the saved runs
    python benchmarks/bench_adapters.py --pissa --optimizers mezo,cma,zo-adam

MiniLM-L6 on Rotten Tomatoes and 20 Newsgroups (k per class, linear-probe start), one adapter type at a
time: each is one ``bench_optimizers.py --adapter SPEC`` run set (subprocess, ``--tag adapters-<slug>``,
its own report inside the cache), so export, seeds, start, budget, timing and process layout are that
script's. The test set is scored at the start and at the end only (``--eval-every`` = budget). This
script plans, prints a time estimate, and renders one table per task, one plot, and a "default for ZO"
paragraph computed from the numbers, between the markers below in the report (replaced when present,
appended otherwise; bench_optimizers keeps them when it re-renders the file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_optimizers as bo  # benchmarks/ is on sys.path when run as a script; imports nothing heavy
from common import machine_facts

ADAPTERS = ["lora:rank=8,alpha=16", "lora:rank=2,alpha=4", "loldu", "tt", "bone"]  # the first is the reference
PISSA = "lora:init=pissa"
# Sizing, measured with bench_optimizers on this machine (2-core Xeon, ONNX Runtime, one intra-op thread):
# CPU s per forward pass of a batch of 32 (RT snippets are short; 20NG posts fill the 128 tokens), and the
# wall time of an export (torch trace + verification) and of the prep's fixed part (data, session).
CPU_PER_FORWARD = {"rt": 0.55, "20ng": 1.40}
CPU_PER_BACKPROP_STEP = {"rt": 0.9, "20ng": 2.4}  # peft LoRA + AdamW, the same batches (forward + backward)
TRAIN_SIZE = {"rt": lambda k: 2 * k, "20ng": lambda k: 20 * k}  # the probe scores every k-shot example
EXPORT_S, PREP_FIXED_S, RUN_FIXED_S = 20, 5, 4


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", dest="adapters", action="append", metavar="SPEC",
                   help=f"adapter spec for bench_optimizers --adapter (repeatable; default: {' '.join(ADAPTERS)})")
    p.add_argument("--pissa", action="store_true", help=f"also run {PISSA}")
    p.add_argument("--tasks", default="rt,20ng", help="comma-separated subset of: rt, 20ng")
    p.add_argument("--optimizers", default="mezo,cma", help="mezo is always run; cma was the best in the RT run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=40, help="training forward passes per run (see the estimate)")
    p.add_argument("--eval-every", type=int, help="score the test set every N forward passes (default: budget)")
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="runs at once (bench_optimizers --workers)")
    p.add_argument("--threads", type=int, help="intra-op threads per run (default: cores / workers)")
    p.add_argument("--backprop", action="store_true",
                   help="also the peft backprop line for the first adapter (plain LoRA only), as a reference")
    p.add_argument("--out", type=Path, help="report to put the section in (default docs/OPTIMIZERS.md; "
                                            "--quick: in the cache); the plot is written beside it")
    p.add_argument("--resume", action="store_true", help="keep finished runs (bench_optimizers --resume)")
    p.add_argument("--render-only", action="store_true", help="only re-render the section from the saved runs")
    p.add_argument("--quick", action="store_true", help="check run: lora r=8 and r=2, seed 0, budget 20, 64 test examples")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters = args.adapters or ADAPTERS[:2]
        args.seeds, args.budget, args.test_size = "0", 20, 64
    args.adapters = (args.adapters or list(ADAPTERS)) + ([PISSA] if args.pissa else [])
    try:
        args.slugs = [bo.adapter_slug(bo.parse_adapter(a)) for a in args.adapters]
    except ValueError as err:
        p.error(str(err))
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or set(args.tasks) - {"rt", "20ng"}:
        p.error("--tasks: rt and/or 20ng")
    args.optimizers = [bo.REFERENCE] + [o.strip() for o in args.optimizers.split(",") if o.strip() not in ("", bo.REFERENCE)]
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.eval_every = args.eval_every or args.budget
    args.workers = max(1, args.workers)
    args.name = "adapters-quick" if args.quick else "adapters"
    args.out = args.out or (bo.CACHE / args.name / "ADAPTERS.md" if args.quick else bo.REPO / "docs" / "OPTIMIZERS.md")
    return args


def tag_of(state: dict, slug: str) -> str:
    return f"{state['name']}-{slug}"


def command(state: dict, spec: str, slug: str, resume: bool) -> list[str]:
    tag = tag_of(state, slug)
    cmd = [sys.executable, str(Path(bo.__file__).resolve()), "--adapter", spec, "--tasks", ",".join(state["tasks"]),
           "--optimizers", ",".join(state["optimizers"]), "--seeds", ",".join(map(str, state["seeds"])),
           "--budget", str(state["budget"]), "--eval-every", str(state["eval_every"]),
           "--test-size", str(state["test_size"]), "--k", str(state["k"]), "--workers", str(state["workers"]),
           "--tag", tag, "--out", str(bo.CACHE / tag / "OPTIMIZERS.md")]
    if state["threads"]:
        cmd += ["--threads", str(state["threads"])]
    if not (state["backprop"] and spec == state["adapters"][0] and bo.backprop_possible(bo.parse_adapter(spec))):
        cmd.append("--no-backprop")
    return cmd + (["--resume"] if resume else [])


def estimate_s(state: dict) -> tuple[float, int]:
    """(wall seconds on an idle machine, runs); the runs' CPU time is split over the workers."""
    seeds, n_opt, cores = len(state["seeds"]), len(state["optimizers"]), os.cpu_count() or 1
    evals = 1 + (state["budget"] - 1) // state["eval_every"]
    prep, runs_cpu, extra = 0.0, 0.0, 0.0
    for task in state["tasks"]:
        c, batches = CPU_PER_FORWARD[task], -(-state["test_size"] // 32)
        probe = -(-TRAIN_SIZE[task](state["k"]) // 32)
        prep += EXPORT_S + PREP_FIXED_S + seeds * (probe + batches) * c / min(2, cores)  # the prep uses every core
        runs_cpu += seeds * n_opt * (RUN_FIXED_S + c * (state["budget"] + evals * batches))
        if state["backprop"]:  # first adapter only: torch training, then scoring in its own process
            extra += seeds * (3 * RUN_FIXED_S + CPU_PER_BACKPROP_STEP[task] * state["budget"] + c * evals * batches)
    per_adapter = prep + runs_cpu / min(state["workers"], cores)
    runs = seeds * n_opt * len(state["tasks"]) * len(state["adapters"])
    return per_adapter * len(state["adapters"]) + extra / min(state["workers"], cores), runs


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    state_path = bo.CACHE / args.name / "config.json"
    if args.render_only:
        return render(json.loads(state_path.read_text()), args.out)
    state = {"name": args.name, "adapters": args.adapters, "slugs": args.slugs, "tasks": args.tasks,
             "optimizers": args.optimizers, "seeds": args.seeds, "budget": args.budget,
             "eval_every": args.eval_every, "test_size": args.test_size, "k": args.k, "workers": args.workers,
             "threads": args.threads, "backprop": args.backprop, "quick": args.quick,
             "facts": machine_facts(("onnxruntime", "numpy")), "failed": []}
    settings = ("adapters", "tasks", "optimizers", "seeds", "budget", "eval_every", "test_size", "k", "backprop")
    prev = json.loads(state_path.read_text()) if args.resume and state_path.is_file() else {}
    if prev and all(prev.get(k) == state[k] for k in settings):  # the same run, continued: keep its start facts
        state.update(facts=prev["facts"], wall_before_s=prev.get("wall_s") or 0.0, wall_known=prev.get("wall_known"))
    else:
        state["wall_known"] = not args.resume  # resuming another run's leftovers: its earlier time is unknown
    idle, runs = estimate_s(state)
    load = state["facts"]["load"][0]
    busy = max(1.0, (load + min(args.workers, os.cpu_count() or 1)) / (os.cpu_count() or 1))  # fair share of the cores
    print(f"{len(args.adapters)} adapter(s) × {len(args.tasks)} task(s) × {len(args.optimizers)} optimizer(s) × "
          f"{len(args.seeds)} seed(s) = {runs} runs of {args.budget} forward passes, {args.workers} at a time, "
          f"+ {len(args.adapters) * len(args.tasks)} exports/preps.\nEstimate: ≈ {idle / 60:.0f} min on an idle machine; "
          f"≈ {idle * busy / 60:.0f} min if the current load ({load:.1f} on {os.cpu_count()} cores) persists"
          + (" (finished runs are skipped: less)" if args.resume else "")
          + ". Costs per forward pass are LoRA's; other types may cost more.", flush=True)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state))
    started = time.perf_counter()
    for spec, slug in zip(args.adapters, args.slugs):
        print(f"\n=== {spec} (tag {tag_of(state, slug)}) [{(time.perf_counter() - started) / 60:.1f} min]", flush=True)
        if subprocess.run(command(state, spec, slug, args.resume)).returncode != 0:
            state["failed"].append(spec)
            print(f"=== {spec}: FAILED (rendered with what it left)", flush=True)
    state["wall_s"] = state.get("wall_before_s", 0.0) + time.perf_counter() - started
    state_path.write_text(json.dumps(state))
    render(state, args.out)
    print(f"took {state['wall_s'] / 60:.1f} min (estimate {idle / 60:.0f} min idle, {idle * busy / 60:.0f} at the start's load)")


# --- report ---------------------------------------------------------------------------------


def load_adapter(state: dict, spec: str, slug: str) -> tuple[dict | None, str]:
    """({task: {optimizer: [runs]}} of one adapter's tag, or None; and why not)."""
    run_dir = bo.CACHE / tag_of(state, slug)
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None, "not run"
    wanted = bo.parse_adapter(spec)
    for task in state["tasks"]:
        t = cfg.get("tasks", {}).get(task)
        if not t or t.get("adapter") != wanted or cfg["seeds"] != state["seeds"] or any(
                t[k] != state[k] for k in ("budget", "eval_every", "test_size", "k")):
            return None, f"{run_dir.name} holds runs of other settings"
    return bo.load_results(cfg, run_dir), ""


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def rows_for(state: dict, task: str, loaded: dict) -> list[dict]:
    """One row per adapter: sizes, start, finals per optimizer, costs."""
    rows = []
    for spec, slug in zip(state["adapters"], state["slugs"]):
        results, why = loaded[spec]
        runs = (results or {}).get(task, {})
        row = {"spec": spec, "why": why or "failed", "finals": {}, "rss": {}, "cpu": None}
        every = [r for name in state["optimizers"] for r in runs.get(name, [])]
        if every:
            a = every[0]["adapter"]
            row.update(trainable=a["trainable"], head=a["size"] - a["trainable"], kind=a["kind"],
                       start=stats([r["curve"][0]["value"] for r in runs.get(bo.REFERENCE) or every]))
        for name in state["optimizers"] + [bo.BACKPROP]:
            done = [r for r in runs.get(name, []) if r["forward_passes"] >= state["budget"]]
            if done:
                row["finals"][name] = [r["curve"][-1]["value"] for r in done]
                row["rss"][name] = statistics.median(r["peak_rss_mb"] for r in done)
        mezo = [r for r in runs.get(bo.REFERENCE, []) if "cpu_s_per_forward" in r]
        row["cpu"] = statistics.median(r["cpu_s_per_forward"] for r in mezo) if mezo else None
        row["loads"] = [x for r in every for x in r.get("load", [])]
        rows.append(row)
    return rows


def noise(rows: list[dict], n_test: int) -> float:
    """Standard error of one accuracy on this test set, at the mean start accuracy: sqrt(p(1-p)/n)."""
    starts = [r["start"][0] for r in rows if "start" in r]
    p = statistics.mean(starts) if starts else 0.5
    return math.sqrt(p * (1 - p) / n_test)


def differs(a: list[float], b_mean: float, b_sd: float, n_b: int, se: float) -> float:
    """mean(a) - b when it exceeds 2 × max(test-set SE, seed SE of the difference); else 0."""
    m, sd = stats(a)
    seed_se = math.sqrt(sd**2 / len(a) + b_sd**2 / max(1, n_b))
    delta = m - b_mean
    return delta if abs(delta) > 2 * max(se, seed_se) else 0.0


def table(state: dict, rows: list[dict]) -> str:
    others = state["optimizers"][1:]
    head = (["adapter", "trainable params (+ head)", "start acc", "MeZO final acc (Δ)"]
            + [f"`{o}` final acc (Δ)" for o in others]
            + ["MeZO CPU s / fwd", "peak RSS MB (" + " / ".join(["MeZO"] + [f"`{o}`" for o in others]) + ")"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "start" not in row:
            lines.append(f"| `{row['spec']}` | {row['why']} |" + " |" * (len(head) - 2))
            continue

        def final(name):
            values = row["finals"].get(name)
            if not values:
                return "–"
            m, sd = stats(values)
            n = f" ({len(values)}/{len(state['seeds'])} seeds)" if len(values) < len(state["seeds"]) else ""
            return f"{m:.3f} ± {sd:.3f} ({100 * (m - row['start'][0]):+.1f}){n}"

        rss = " / ".join(f"{row['rss'][n]:.0f}" if n in row["rss"] else "–" for n in state["optimizers"])
        cells = [f"`{row['spec']}` ({row['kind']})", f"{row['trainable']:,} (+ {row['head']:,})",
                 f"{row['start'][0]:.3f} ± {row['start'][1]:.3f}", *[final(n) for n in state["optimizers"]],
                 f"{row['cpu']:.3f}" if row["cpu"] is not None else "–", rss]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_notes(state: dict, rows: list[dict], se: float) -> list[str]:
    notes = []
    starts = [r["start"][0] for r in rows if "start" in r]
    if len(starts) > 1:
        spread = max(starts) - min(starts)
        notes.append(f"Start check (every type starts at the base model, so the linear-probe start should agree): "
                     f"start accuracies span {100 * spread:.1f} points across adapters"
                     + (" — identical." if spread < 1e-9 else " — more than one standard error: check that every type starts at the base model."
                        if spread > se else "."))
    ref = rows[0]
    bp = ref["finals"].get(bo.BACKPROP) if "start" in ref else None
    if bp:
        m, sd = stats(bp)
        notes.append(f"Reference: backprop (peft LoRA + AdamW, `{ref['spec']}`), {state['budget']} steps "
                     f"(each 1 forward + 1 backward pass): final {m:.3f} ± {sd:.3f} ({100 * (m - ref['start'][0]):+.1f}).")
    return notes


def verdict(state: dict, per_task: dict, ses: dict) -> str:
    """The "default for ZO" paragraph: what moved beyond noise, what beat the reference, what follows."""
    ref_spec = state["adapters"][0]
    names = state["optimizers"]
    label = {n: "MeZO" if n == bo.REFERENCE else f"`{n}`" for n in names}
    text = []
    for name in names:  # did training move anything?
        gains, moved, hurt = [], [], []
        for task, rows in per_task.items():
            for row in rows:
                if name in row["finals"]:
                    m, _ = stats(row["finals"][name])
                    gains.append((m - row["start"][0], row["spec"], task))
                    d = differs(row["finals"][name], *row["start"], len(row["finals"][name]), ses[task])
                    if d:
                        (moved if d > 0 else hurt).append(f"`{row['spec']}` on {task} ({100 * d:+.1f})")
        if not gains:
            continue
        top = max(gains)
        sentence = (f"{label[name]} improved on the start beyond noise for {', '.join(moved)}" if moved else
                    f"{label[name]} improved on the start beyond noise for no adapter on any task (largest mean gain "
                    f"{100 * top[0]:+.1f} points, `{top[1]}` on {top[2]})")
        text.append(sentence + (f"; it ended worse than the start beyond noise for {', '.join(hurt)}" if hurt else "") + ".")
    complete = [spec for i, spec in enumerate(state["adapters"])  # rows follow state["adapters"] in every task
                if all(name in rows[i]["finals"] for rows in per_task.values() for name in names)]
    missing = [f"`{spec}`" for spec in state["adapters"] if spec not in complete]
    if missing:
        text.append(f"Not compared (runs missing on some task or optimizer): {', '.join(missing)}.")
    if ref_spec not in complete:
        text.append(f"**No recommendation:** the reference `{ref_spec}` has no complete results.")
        return " ".join(text)
    better, worse = {}, {}  # spec → ["task with optimizer (+x.x)"]
    for task, rows in per_task.items():
        ref = rows[0]
        for row in rows[1:]:
            for name in names if row["spec"] in complete else []:
                if name in row["finals"] and name in ref["finals"]:
                    rm, rsd = stats(ref["finals"][name])
                    d = differs(row["finals"][name], rm, rsd, len(ref["finals"][name]), ses[task])
                    if d:
                        (better if d > 0 else worse).setdefault(row["spec"], []).append(
                            f"{task} with {label[name]} ({100 * d:+.1f})")
    compared = [r["spec"] for r in next(iter(per_task.values()))[1:]]
    for spec in compared:
        if spec in better or spec in worse:
            text.append(f"`{spec}` against `{ref_spec}`: " + "; ".join(
                ([f"better on {', '.join(better[spec])}"] if spec in better else [])
                + ([f"worse on {', '.join(worse[spec])}"] if spec in worse else [])) + " (points).")
    winners = [s for s in better if s not in worse]
    if winners:
        params = {r["spec"]: r.get("trainable", 0) for rows in per_task.values() for r in rows}
        best = max(winners, key=lambda s: (len(better[s]), -params[s]))
        with_mezo = [b for b in better[best] if "with MeZO" in b]
        text.append(f"**Default for ZO: `{best}`.** It beat `{ref_spec}` beyond noise ({'; '.join(better[best])}) "
                    f"and was never worse beyond noise on any task or optimizer"
                    + ("" if with_mezo else "; note that its advantage shows with a population optimizer, not with MeZO")
                    + (f" (also unbeaten: {', '.join(f'`{w}`' for w in winners if w != best)})" if len(winners) > 1 else "")
                    + ".")
    else:
        mixed = [s for s in better if s in worse]
        text.append(f"**Default for ZO: keep `{ref_spec}`.** "
                    + (f"{', '.join(f'`{s}`' for s in mixed)} won on one task or optimizer and lost on another; "
                       if mixed else "")
                    + f"{'N' if not mixed else 'n'}o adapter type beat it beyond noise without also losing somewhere, so these numbers give no "
                      f"reason to change the default.")
        params = {r["spec"]: r["trainable"] for r in next(iter(per_task.values())) if r["spec"] in complete}
        tied = sorted((params[spec], spec) for spec in complete if spec != ref_spec and spec not in worse)
        ref_params = params[ref_spec]
        if tied and tied[0][0] < ref_params:
            text.append(f"Not worse beyond noise, and smaller: `{tied[0][1]}` trains {tied[0][0]:,} values against "
                        f"{ref_params:,} for `{ref_spec}`; this run does not show that fewer values help ZO "
                        f"(the expected benefit: ZO's gradient estimate gets noisier with the dimension), only that "
                        f"they did not measurably hurt at this budget.")
    return " ".join(text)


def plot(state: dict, per_task: dict, ses: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_task), figsize=(6.2 * len(per_task), 4.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (task, rows) in zip(axes[0], per_task.items()):
        xs = range(len(rows))
        starts = [r["start"][0] for r in rows if "start" in r]
        if starts:
            s = statistics.mean(starts)
            ax.axhspan(s - 2 * ses[task], s + 2 * ses[task], color="grey", alpha=0.15, label="start ± 2 SE (test noise)")
        ax.plot([x for x, r in zip(xs, rows) if "start" in r], starts, "_", ms=18, mew=2, color="grey", label="start")
        for i, name in enumerate(state["optimizers"] + [bo.BACKPROP]):
            pts = [(x, *stats(r["finals"][name])) for x, r in zip(xs, rows) if name in r["finals"]]
            if pts:
                off = (i - (len(state["optimizers"]) - 1) / 2) * 0.12
                ax.errorbar([p[0] + off for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o",
                            capsize=3, color="black" if name == bo.REFERENCE else colours(i),
                            label=f"{'MeZO' if name == bo.REFERENCE else name} final (mean ± sd, seeds)")
        ax.set_xticks(list(xs))
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xticklabels([r["spec"].replace(":", "\n") + (f"\n{r['trainable']:,} trainable" if "start" in r else "")
                            for r in rows], fontsize=7)
        ax.set_title(f"{bo.TASK_TITLES[task]}: {state['budget']} forward passes", fontsize=10)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=7, loc="best")
    if state["quick"]:
        fig.suptitle("SMOKE RUN (--quick): these numbers mean nothing", color="red")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(state: dict, out: Path) -> None:
    loaded = {spec: load_adapter(state, spec, slug) for spec, slug in zip(state["adapters"], state["slugs"])}
    per_task = {task: rows_for(state, task, loaded) for task in state["tasks"]}
    ses = {task: noise(rows, state["test_size"]) for task, rows in per_task.items()}
    plot_path = out.parent / "adapters-accuracy.png"
    plot(state, per_task, ses, plot_path)
    facts, n_seeds = state["facts"], len(state["seeds"])
    loads = [x for rows in per_task.values() for r in rows for x in r["loads"]]
    others = [f"`{o}`" for o in state["optimizers"][1:]]
    gens = -(-state["budget"] // 20)
    cma = f"; CMA-ES: {gens} generation{'s' if gens > 1 else ''} of 20" if "cma" in state["optimizers"] else ""
    threads = state["threads"] or max(1, (facts["cores"] or 1) // state["workers"])
    backprop = (f"a reference line for `{state['adapters'][0]}` below each table" if state["backprop"]
                else "not run")
    sections = []
    for task, rows in per_task.items():
        notes = task_notes(state, rows, ses[task])
        sections.append(f"### {bo.TASK_TITLES[task]}\n\n{table(state, rows)}\n" + "".join(f"\n- {n}" for n in notes) + "\n")
    smoke = ("> **SMOKE RUN (`--quick`): a tiny budget, one seed, a small test set. These numbers only show that "
             "the script works end to end; they say nothing about the adapters.**\n\n" if state["quick"] else "")
    failed = f"\n**Failed** (see the run's console output and each tag's `logs/`): {', '.join(f'`{s}`' for s in state['failed'])}\n" if state["failed"] else ""
    se_text = ", ".join(f"{task} {100 * se:.1f}" for task, se in ses.items())
    load_text = (f"median {statistics.median(loads):.1f}, max {max(loads):.1f} (1-min load average at each run's start "
                 f"and end) on {facts['cores']} cores" if loads else "not recorded")
    wall = (f"; the whole run took {state['wall_s'] / 60:.0f} min"
            + (" (summed over its --resume invocations)" if state.get("wall_before_s") else "")
            if state.get("wall_known") and state.get("wall_s") else "")
    section = f"""{bo.ADAPTERS_BEGIN}
## Adapter types: trainable parameters and accuracy after {state['budget']} forward passes

{smoke}For each adapter type (`edgeft.export.ExportOptions(adapter=..., rank=...)`, query and value of every layer;
the classification head is trained too and counted apart), `benchmarks/bench_optimizers.py --adapter SPEC`
trained MeZO{' and ' + ', '.join(others) if others else ''} at their default settings from the same linear-probe
start per seed. **Budget: {state['budget']} training forward passes per run** (MeZO: {state['budget'] // 2} steps of 2{cma});
the test set is scored at the start and after the budget.
**Seeds: {', '.join(map(str, state['seeds']))}** (each draws the k-shot set, random adapter inits and the optimizer);
k = {state['k']} per class, batch 32; **test: a fixed subset of {state['test_size']} examples**, disjoint from training.
Δ: the change from the start, in points. Backprop (peft builds plain LoRA only): {backprop}. Runs went {state['workers']} at a time, {threads} intra-op thread{'s' if threads > 1 else ''} each;
**machine load** during the runs: {load_text}{wall}.

**Noise.** One accuracy on {state['test_size']} test examples has a standard error of √(p(1−p)/n) ≈ {se_text}
points at the start accuracy. A difference is called real below only when it exceeds twice that, and twice the
seed spread's standard error of the difference ({n_seeds} seed{'s' if n_seeds > 1 else ''}); smaller ones are
within noise.
{failed}
{chr(10).join(sections)}
![test accuracy per adapter type: start and final, mean ± sd over seeds]({plot_path.name})

Raw runs: `benchmarks/.cache/optimizers/{state['name']}-<adapter>/` ({', '.join(state['slugs'])}; re-render: `python benchmarks/bench_adapters.py
--render-only{' --quick' if state['quick'] else ''}`). Machine: {facts['cpu']}, {facts['cores']} cores, onnxruntime
{facts['onnxruntime']}; started {facts['date']}; command `{facts['command']}`.

### Default adapter for ZO

{verdict(state, per_task, ses)}
{bo.ADAPTERS_END}"""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.is_file() else ""
    out.write_text(bo.with_marked_section(old, section) if old.strip() else section + "\n")
    print("\n" + section)
    print(f"\nwritten to {out} (plot {plot_path})")


if __name__ == "__main__":
    main()
