"""bench_learning.py's tasks and lines, and the report drawn from its per-run JSON files: one table,
paired differences and one plot per task (docs/LEARNING.md, docs/learning-<task>.png), the hand-written
reading (docs/learning-notes.md) appended."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

TRAIN_PLAYS = ("tragedies/hamlet", "tragedies/othello", "tragedies/king-lear")
DEV_PLAY, TEST_PLAY = "tragedies/romeo-and-juliet", "tragedies/macbeth"
LR_GRID = ("1e-3", "1e-2", "1e-1")  # 20ng, rt: lines "OPTIMIZER@LR" run with that explicit lr (MonteCLoRA's robustness claim)
LINES = {"shakespeare": ("mezo", "fzoo", "bias-only", "bias-all", "bias+mezo", "fit-only", "fit+mezo", "fit-all-last",
                         "mlp1-auto", "mlp1-auto-heldback", "mlp1-auto-heldback-10m", "blocks6-auto-heldback",
                         "blocks6-auto-heldback-10m", "wholegraph-auto-heldback", "wholegraph-auto-heldback-10m",
                         "constant-lr-auto-heldback-10m", "auto",
                         "auto-heldback", "backprop", "auto-heldback-10m", "backprop-10m"),
         "rt-prompt": ("mezo", "probe", "probe+mezo", "uncalibrated-auto-10m", "auto-10m", "auto-nodev-10m",
                       "backprop-10m"),
         "20ng": ("probe", "mezo", "mezo+refit", "lozo", "zo-activations", "cma", "lora-pro", "monteclora",
                  *(f"{name}@{lr}" for name in ("mezo", "monteclora") for lr in LR_GRID), "backprop", "tempered-auto-10m", "auto",
                  "auto-10m", "auto-nodev-10m"),
         "rt": ("probe", "mezo", "mezo+refit", "lozo", "zo-activations", "cma", "monteclora",
                *(f"{name}@{lr}" for name in ("mezo", "monteclora") for lr in LR_GRID), "backprop", "auto", "auto-10m"),
         "speakers": ("probe", "mezo", "fzoo", "cma", "backprop", "auto", "auto-10m")}
CLASSIFICATION = ("20ng", "rt", "speakers")  # MiniLM classification tasks: the start is each seed's probe line
# rows kept from earlier code or bundles, not runnable now ("mlp1-": the top-MLP fit of bundles exported before
# the top-blocks fit; fit-only and fit+mezo were measured with such a bundle too; "blocks6-": a bundle fitting
# the top 6 blocks, export --fit-layers 6; "wholegraph-": the default top-24-block fit of session 17's bundle, whose
# fit read its input from the whole graph, beside a second copy of the blocks' weights; "constant-lr-": the fit at a
# constant lr, before its lr fell linearly to zero over the budget; "tempered-": session 19's encoder fit, from the
# temperature-scaled probe, uncalibrated after)
HISTORICAL = ("bias-only", "bias-all", "bias+mezo", "fit-all-last", "mlp1-auto", "mlp1-auto-heldback", "mlp1-auto-heldback-10m",
              "blocks6-auto-heldback", "blocks6-auto-heldback-10m", "wholegraph-auto-heldback", "wholegraph-auto-heldback-10m",
              "constant-lr-auto-heldback-10m", "tempered-auto-10m", "probe+mezo", "uncalibrated-auto-10m")
RT_TEST, RT_DEV, RT_SEED = 1000, 200, 1234
SPEAKERS_PLAY, SPEAKERS = "tragedies/othello", 2  # who speaks a line: Iago or Othello (the two with the most lines)
SPEAKERS_MIN_WORDS = 4  # a line shorter than this ("My lord?") says nothing of its speaker
SAMPLES = 4  # monteclora: adapters drawn from its distribution for the sampled test score


def _section(task: str, docs: Path) -> str | None:
    """One task's table, paired differences and plot, from the per-run JSON files kept so far."""
    longer = [other for other in LINES if other != task and other.startswith(task)]  # "rt" is a prefix of "rt-prompt"
    records = [json.loads(p.read_text()) for p in sorted((docs / "learning-runs").glob(f"{task}-*.json"))
               if not any(p.name.startswith(f"{other}-") for other in longer)]
    start = next((r for r in records if r["line"] == "start"), None)
    runs = [r for r in records if r["line"] != "start"]
    probes = [r["test"]["accuracy"] for r in runs if r["line"] == "probe"]
    if start is None and probes:  # classification: the start is each seed's linear probe (its own line)
        start = {"test": {"accuracy": statistics.median(probes)}}
    if start is None or not runs:
        return None
    lm = task == "shakespeare"
    key = "perplexity" if lm else "accuracy"
    base = start["test"][key]
    by_line: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_line.setdefault(r["line"], {})[r["seed"]] = r
    budget = runs[0]["budget_fwd"]
    change = (lambda v: f"{100 * (v / base - 1):+.1f}%") if lm else (lambda v: f"{100 * (v - base):+.1f} points")
    fmt = (lambda v: f"{v:.2f}") if lm else (lambda v: f"{100 * v:.1f}%")
    rows = [f"| line | seeds | test {key}, median (min–max) | vs start | training fwd | wall s (train) | peak RSS MB |",
            "|---|---|---|---|---|---|---|", f"| start | – | {fmt(base)} | – | 0 | – | – |"]
    for line in LINES[task]:
        got = by_line.get(line)
        if not got:
            continue
        values = [r["test"][key] for r in got.values()]
        med = statistics.median(values)
        rss = max(r["train"]["peak_rss_mb"] or 0 for r in got.values())  # none for a probe scored untrained
        rows.append(f"| {line} | {','.join(map(str, sorted(got)))} | {fmt(med)} ({fmt(min(values))}–{fmt(max(values))}) | "
                    f"{change(med)} | {statistics.median(r['train']['forward_passes'] for r in got.values()):.0f} | "
                    f"{statistics.median(r['train']['elapsed_s'] for r in got.values()):.0f} | "
                    f"{f'{rss:.0f}' if rss else '–'} |")
    paired = []
    for main_line in (("auto", "auto-10m", "mezo+refit", "lozo", "zo-activations", "lora-pro", "monteclora", "fzoo", "backprop") if task in CLASSIFICATION else ("auto", "auto-10m", "auto-nodev-10m", "auto-heldback", "auto-heldback-10m")):
        others = (("mezo", "cma", "bias+mezo", "fit+mezo", "auto", "probe", "probe+mezo", "uncalibrated-auto-10m", "backprop",
                   "backprop-10m") if not lm
                  else ("mezo", f"mlp1-{main_line}", f"blocks6-{main_line}", f"wholegraph-{main_line}",
                        f"constant-lr-{main_line}", "backprop", "backprop-10m"))  # the LM: vs older bundles too
        for other in others:
            if main_line not in by_line or other not in by_line or other == main_line:
                continue
            for seed in sorted(set(by_line[main_line]) & set(by_line[other])):
                a, m = by_line[main_line][seed]["test"][key], by_line[other][seed]["test"][key]
                diff = f"{100 * (a / m - 1):+.1f}%" if lm else f"{100 * (a - m):+.1f} points"
                paired.append(f"seed {seed}: {main_line} {fmt(a)} vs {other} {fmt(m)} ({diff})")
    calibration = ""
    if task in CLASSIFICATION:
        lines = ["| line | test ECE, median (min–max) | sampled accuracy | sampled ECE | mean spread |", "|---|---|---|---|---|"]
        for line in LINES[task]:
            got = [r for r in by_line.get(line, {}).values() if "ece" in r["test"]]
            if not got:
                continue
            eces = [r["test"]["ece"] for r in got]
            sampled = [r["test_sampled"] for r in got if r.get("test_sampled")]
            cells = (f"{fmt(statistics.median(x['accuracy'] for x in sampled))} | "
                     f"{statistics.median(x['ece'] for x in sampled):.3f} | {statistics.median(x['spread'] for x in sampled):.4f}"
                     if sampled else "– | – | –")
            lines.append(f"| {line} | {statistics.median(eces):.3f} ({min(eces):.3f}–{max(eces):.3f}) | {cells} |")
        calibration = "" if len(lines) == 2 else "\n\nCalibration (monteclora's sampled columns: the mean of " + str(SAMPLES) + " adapters drawn from it):\n\n" + "\n".join(lines)
    _plot(task, by_line, base, key, docs)
    if lm:
        head = f"""## SmolLM2-135M causal LM, Shakespeare

`python benchmarks/bench_learning.py --task shakespeare --bundle BUNDLE --seeds 0,1,2 --budget {budget}` — SmolLM2-135M-Instruct
(fp32 from the Q4_1 GGUF, LoRA r=8 on q/v + output bias), training windows of 128 tokens from {', '.join(TRAIN_PLAYS)};
the kept adapter is chosen on 16 windows of {DEV_PLAY}; **test perplexity on {start['test']['tokens']:.0f} tokens of
{TEST_PLAY}** (never used for training or selection). Every run: {budget} training forward passes at batch
{runs[0]['batch_size']}, one ORT thread, one subprocess (`edgeft train` then `edgeft eval`).

Lines: `mezo` = MeZO at edgeft's defaults on LoRA (no output fit); `fzoo` = FZOO (N = 8) on LoRA; `fit-only` =
the output fit alone — the output bias and LoRA r=8 on the top layer's MLP (gate, up, down) by Adam on their exact
gradient (40 steps, one pass each); `fit+mezo` = that fit, then MeZO on the body for the rest of the budget; `auto` =
edgeft's default recipe now: the output fit for the whole budget — the output bias and LoRA r=8 on the MLPs of the
top 24 of the 30 blocks (80%, the default of a bundle exported since session 17: `export/top_blocks.py`), its lr falling
linearly to zero over the budget (since session 18) —, its best point on the dev windows kept (scored
every 25 steps); `auto-heldback` = the same run without `--eval-data`, as a user without a dev text runs it: the
run ranks its adapters on 16 windows it holds back from the training plays (every 10th); `auto-heldback-10m`,
`backprop-10m` = auto-heldback and backprop given 10 minutes of one core each (the whole run's time, evaluations
included) instead of a pass count; `mlp1-auto`, `mlp1-auto-heldback`, `mlp1-auto-heldback-10m` = those three lines
with the previous bundle, whose fit was the top layer's MLP only (sessions 13–16, kept, not re-run); `blocks6-auto-heldback`,
`blocks6-auto-heldback-10m` = the two held-back lines with the top 6 blocks fitted (`--fit-layers 6`, session 17);
`wholegraph-auto-heldback`, `wholegraph-auto-heldback-10m` = the two held-back lines with session 17's bundle of the same
fit, which read the blocks' input from the whole graph and so held their weights twice (kept, not re-run; since session
18 the fit embeds the tokens in numpy and runs only the graph of the 6 layers below the blocks);
`constant-lr-auto-heldback-10m` = auto-heldback-10m with that bundle at the fit's constant lr (session 18, before the
decay); `fit-all-last` = a 200-step fit returning its last step (one seed, before the fit kept its best
point); `bias-only`, `bias-all`, `bias+mezo` = fit-only, a 200-step fit and fit+mezo when the output fit was the bias
alone (session 7's code and bundle, kept, not re-run); `backprop` = peft LoRA + AdamW lr 3e-4 in torch (one forward and one backward per step; its "fwd" column counts
steps; kept on dev every 10 steps like the others)."""
    elif task in CLASSIFICATION:
        what = {"20ng": ("20 Newsgroups", "20 labels", "16 examples per label drawn per seed (320, batches of 32); {RT_DEV} "
                         "examples of the test split pick"),
                "rt": ("Rotten Tomatoes", "2 labels", "16 examples per label drawn per seed (32, the whole set as the batch); "
                       "{RT_DEV} dev snippets pick"),
                "speakers": (f"who speaks a line of {SPEAKERS_PLAY}", f"its {SPEAKERS} characters with the most lines",
                             "16 lines per character drawn per seed (64, the whole set as the batch; lines of at least "
                             f"{SPEAKERS_MIN_WORDS} words, speeches split between train, dev and test); {{RT_DEV}} dev lines pick")}[task]
        head = f"""## MiniLM-L6 classification, {what[0]}

`python benchmarks/bench_learning.py --task {task} --bundle BUNDLE --seeds 0,1,2 --budget {budget}` — all-MiniLM-L6-v2
(LoRA r=8 on q/v + a linear-probe head, {what[1]}), {what[2].format(RT_DEV=RT_DEV)} the kept adapter; **accuracy on
{RT_TEST} others** (standard error ≈ 1.5 points). Every run: {budget} training forward passes, one ORT thread.

Lines: `probe` = each seed's start (its k-shot draw, LoRA init and linear-probe head — its logits scaled by the
cross-validated temperature from 100 examples on, i.e. on 20NG since session 15 —, scored untrained; `start`
is their median); `mezo` = MeZO at edgeft's defaults on LoRA + head; `lozo` = LOZO's low-rank directions; `zo-activations` =
directions whose LoRA A part lies in the top 16 principal directions of its layer's input hidden states (ours); `mezo+refit` = that run's kept adapter with its
head refitted as a linear probe on the trained body's features (one LP-FT alternation, at the end: one pass); `cma` = CMA-ES (edgeft's population search) on
the same tensors at the same passes; `lora-pro` = the same with LoRA-Pro's adjustment of each LoRA pair's estimate; `monteclora` = the forward-only
MonteCLoRA (a diagonal Gaussian by natural evolution strategies, 2 antithetic pairs per step), scored at its mean;
`OPTIMIZER@LR` = that optimizer with an explicit --lr (the spread of the score over learning rates); `fzoo` = FZOO
(N one-sided directions per step); `backprop` = the reference: peft LoRA r=8 on q, v of every layer + the probe head, AdamW
lr 1e-3, batch 32, the same k-shot draw, kept on dev every 20 steps (`trial_top_ffn.py head+qvall`; its "fwd" column
counts steps, each a forward and a backward); `auto`, `auto-10m` = edgeft's default since session 19: from the probe start,
the same tensors (LoRA on q, v of every layer + the head) by Adam lr 1e-3 on their exact gradient, computed in numpy
(`runtime/encoder_blocks.py`: the tokens embedded and the 6 layers, pooling and head run forward and backward by hand;
no graph pass), the lr falling linearly to zero over the budget, kept on dev every 25 steps; a step is one batch, counted as
one pass; `auto-10m`: 10 minutes of one core instead of a pass count (the whole run's time). Since session 20 the
fit starts from the probe at C = 1's own scale (no temperature) and, with held-out data, the kept point's head is
scaled by the temperature with the least dev loss (no prediction changes); `tempered-auto-10m` = session 19's fit
from the temperature-scaled probe (20NG only: under 100 examples, RT and speakers never had a temperature);
`auto-nodev-10m` = auto-10m without `--eval-data`, as a user without a dev set runs it (the tempered start, the last
point kept, nothing to calibrate on).
ECE: expected calibration error (15 bins) of the kept adapter on the test set.""" + (
            "\n\nSession 15 re-ran 20NG's probe, mezo, lozo and zo-activations rows from the temperature-scaled probe; the "
            "earlier rows (cma, lora-pro, monteclora, the lr grid, mezo+refit, from the plain C = 1 probe) are kept in "
            "docs/learning-runs/probe-c1-start/ and read in docs/learning-notes.md." if task == "20ng" else "")
    else:
        head = f"""## SmolLM2-135M prompt mode, Rotten Tomatoes

`python benchmarks/bench_learning.py --task rt-prompt --bundle BUNDLE --seeds 0,1,2 --budget {budget}` — the demo's
prompt ("Review: {{text}}\\nSentiment (positive or negative):", label words " negative"/" positive"), LoRA r=8 on q/v +
the label-word output adapter; 16 examples per label drawn per seed, the whole set (32) as the batch; {RT_DEV} dev
snippets pick the kept adapter; **accuracy on {RT_TEST} test snippets** (one test accuracy has a standard error of
≈ 1.5 points). Every run: {budget} training forward passes of the 32 examples, one ORT thread.

Lines: `mezo` = MeZO at edgeft's defaults from the zero-shot prompt; `probe` = the label-word probe alone (fitted on
the 32 examples' hidden states, offset by the zero-shot logits; kept only if it beats zero-shot on dev); `probe+mezo` =
probe (if kept), then MeZO on LoRA for the budget (the default until session 20, a bundle without the top blocks; kept,
not re-run); `auto-10m` = edgeft's default since session 21, given 10 minutes of one core (the whole run's time): from
the probe, the label-word output adapter and LoRA r=8 on the MLPs of the top 24 of 30 blocks by Adam lr 1e-3 on the
exact gradient of the prompt's loss, computed in numpy (`runtime/prompt_fit.py`; the graph below the blocks runs the 6
layers under them, the whole graph is never opened), the lr falling linearly to zero over the budget, its best dev
point kept (every 25 steps) and its logits scaled by the temperature with the least dev loss (no prediction changes),
one step = one pass of the 32 examples; `backprop-10m` = the reference: peft LoRA r=8 on
q, v of every layer + AdamW lr 1e-3 in torch from the zero-shot prompt on the same loss and examples, 10 minutes of
one core, kept on dev every 10 steps (`learning_backprop.py --prompt`; its "fwd" column counts steps, each a forward
and a backward of the 32); `uncalibrated-auto-10m` = auto-10m before its kept point was calibrated on the dev set
and before a time budget reserved the last dev scoring (session 21's first runs; kept, not re-run)."""
    return f"""{head}

{chr(10).join(rows)}{calibration}

Paired by seed: {'; '.join(paired) if paired else 'not yet measured'}.

Plot: `docs/learning-{task}.png`.
"""


def render(docs: Path) -> None:
    sections = [text for text in (_section(task, docs) for task in LINES) if text]
    if not sections:
        print("nothing to render yet")
        return
    text = ("# Learning in a device's budget (issue 12)\n\n`benchmarks/bench_learning.py`; raw per-run results in "
            "`docs/learning-runs/` (one JSON per run, kept as it finishes).\n\n" + "\n".join(sections))
    notes = docs / "learning-notes.md"  # hand-written reading of the tables, kept across re-renders
    if notes.is_file():
        text += "\n" + notes.read_text()
    (docs / "LEARNING.md").write_text(text)
    print(text)


def _plot(task, by_line, base, key, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, line in enumerate(LINES[task]):
        for seed, r in sorted(by_line.get(line, {}).items()):
            ax.scatter(r["train"]["forward_passes"], r["test"][key], color=f"C{i}", label=line if seed == min(by_line[line]) else None)
    ax.axhline(base, color="gray", ls="--", label="start")
    ax.set_xlabel("training forward passes")
    ax.set_ylabel(f"test {key}")
    ax.set_title(task)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / f"learning-{task}.png", dpi=120)
    plt.close(fig)
