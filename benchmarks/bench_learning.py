"""What a device learns in its budget: the default recipe against MeZO, side by side, per seed.

    python benchmarks/bench_learning.py --task shakespeare --bundle LM_BUNDLE [--seeds 0,1,2] [--budget 200]
    python benchmarks/bench_learning.py --task rt-prompt --bundle PROMPT_BUNDLE [--seeds 0,1,2] [--budget 200]
    python benchmarks/bench_learning.py --task 20ng --bundle MINILM_BUNDLE [--seeds 0,1,2] [--budget 200]
    python benchmarks/bench_learning.py --task rt --bundle MINILM_RT_BUNDLE [--seeds 0,1,2] [--budget 200]

Task shakespeare: SmolLM2-135M causal LM — training windows from three tragedies (Hamlet, Othello,
King Lear), the kept adapter chosen on 16 windows of Romeo and Juliet (dev), perplexity on the
first --test-tokens tokens of Macbeth (test, never seen in training or selection). Lines, every
one at the same training forward passes (batch --batch-size):

  start      the base model (LoRA B = 0, output bias 0)
  mezo       MeZO at edgeft's defaults on LoRA, no output fit
  fit-only   the output fit alone (--fit-steps passes): the output bias and the top MLP's LoRA
             from their exact gradient
  fit+mezo   the output fit (--fit-steps passes), then MeZO on the body for the rest of the budget
  auto       edgeft's default: the output fit for the whole budget, its best held-out point kept
  auto-heldback   the same without --eval-data: the run ranks on every 10th training window (16), held back
  auto-heldback-10m, backprop-10m   auto-heldback and backprop with 10 minutes of one core each instead of
             a pass count (the forward passes or steps that bought are in the table)
  fzoo       FZOO (8 one-sided directions + 1 base pass per step) on LoRA, no output fit
  bias-only, bias-all, bias+mezo   kept from session 7 (not re-run): fit-only, a 200-step fit and
             fit+mezo when the output fit was the output bias alone (bundles before the top MLP LoRA)
  fit-all-last   kept (one seed): the 200-step output fit returning its last step, before the fit
             kept its best held-out point
  backprop   reference: peft LoRA r=8 (q, v) + AdamW lr 3e-4 in torch, --backprop-steps steps at the same
             batch, kept on dev like the others (a backward pass: not what a device can run;
             learning_backprop.py, its own process)

Task rt-prompt: SmolLM2-135M prompt mode on Rotten Tomatoes ("Review: {text}\nSentiment (positive or
negative):", " negative"/" positive"), 16 examples per label drawn per seed (the whole set is the
batch), 200 dev snippets pick the kept adapter, accuracy on 1,000 test snippets. Lines: start
(zero-shot), mezo (from zero-shot), probe (the label-word probe alone), auto-10m (the default: the
prompt fit, ``runtime/prompt_fit.py``, for 10 minutes; best dev point, calibrated), auto-nodev-10m (the same
without --eval-data: its last point, uncalibrated), backprop-10m (peft LoRA + AdamW on the same loss);
kept from earlier sessions: probe+mezo (the default before the prompt fit), uncalibrated-auto-10m.

Task 20ng (and rt): all-MiniLM-L6-v2 classification of 20 Newsgroups (20 labels), 16 examples per label drawn per
seed from the training split (320, batch 32), the linear-probe head first; 200 examples of the test split
pick the kept adapter, accuracy on 1,000 others (rt: Rotten Tomatoes as rt-prompt splits it, 16 per label =
32 examples, the whole set per step). Lines: probe (each seed's start: the linear-probe head,
as ``edgeft train`` fits it, saved untrained), auto-nodev-10m (the default without --eval-data: the fit keeps its
last point), mezo (MeZO on LoRA + head), cma (CMA-ES), lora-pro (the same with LoRA-Pro's adjustment,
``runtime/optimizers/lora_pro.py``), monteclora (the NES distribution, ``runtime/optimizers/monteclora.py``; also scored
as the mean prediction of SAMPLES adapters drawn from it, with calibration), and OPTIMIZER@LR for LR in LR_GRID (mezo
and monteclora with that explicit --lr: the spread of the score over learning rates, MonteCLoRA's robustness claim).

Each run is one ``edgeft train`` subprocess (one ORT thread, via a device profile written here),
then ``edgeft eval`` of its saved adapter on the test windows. Per-run results are kept as JSON
in docs/learning-runs/ as they finish, so an interrupted benchmark resumes (--resume skips done
runs); the table (docs/LEARNING.md) and the plot are drawn from those files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import edgeft_json  # benchmarks/ is on sys.path when run as a script
from learning_report import (CLASSIFICATION, DEV_PLAY, HISTORICAL, LINES, RT_DEV, RT_SEED, RT_TEST, SAMPLES, SPEAKERS,
                             SPEAKERS_MIN_WORDS, SPEAKERS_PLAY, TEST_PLAY, TRAIN_PLAYS, render)  # benchmarks/ is on sys.path when run as a script

TIME_BUDGET_S = 600  # lines "-10m": the device budget, 10 minutes of one core (the run's whole time)
PROMPT_BACKPROP_LR = 1e-3  # rt-prompt's backprop reference (the classification reference's; ~25 steps fit 10 minutes)
CLASSIFICATION_BATCH = {"20ng": 32, "rt": 32, "speakers": 64}  # 20ng: batches of its 320; rt, speakers: the whole set
ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"  # --docs moves the table, the plot and learning-runs/ (smoke runs)
RUNS = DOCS / "learning-runs"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(LINES), default="shakespeare")
    p.add_argument("--bundle", type=Path, help="the task's SmolLM2-135M bundle (causal-lm, or prompt for rt-prompt)")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-learning"), help="data files and run folders")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=200, help="training forward passes per run")
    p.add_argument("--fit-steps", type=int, default=40, help="output fit steps (fit-only, fit+mezo)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dev-windows", type=int, default=16)
    p.add_argument("--test-tokens", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lines", help="comma-separated subset of the task's lines (default: all)")
    p.add_argument("--backprop-steps", type=int, default=40)
    p.add_argument("--resume", action="store_true", help="skip runs whose result JSON exists")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--docs", type=Path, default=DOCS, help="where the table, plot and per-run JSON go")
    return p.parse_args(argv)


def _cut(text: str, tokenizer, tokens: int) -> str:
    """The first lines of ``text`` holding at least ``tokens`` tokens."""
    out, count = [], 0
    for line in text.splitlines(keepends=True):
        out.append(line)
        count += len(tokenizer.encode(line).ids)
        if count >= tokens:
            break
    return "".join(out)


def prepare(args) -> dict[str, Path]:
    from tokenizers import Tokenizer

    from edgeft import assets

    args.work.mkdir(parents=True, exist_ok=True)
    profile = args.work / "one-thread.toml"
    profile.write_text('name = "bench-one-thread"\nthreads = 1\nbatch_size = 4\nmax_length = 128\n')
    if args.task == "20ng":
        import numpy as np

        texts, labels = assets.newsgroups("train")
        test_texts, test_labels = assets.newsgroups("test")  # its own split: disjoint from training
        order = np.random.default_rng(RT_SEED).permutation(len(test_texts))
        parts = {"train": list(zip(texts, labels)), "test": [(test_texts[i], test_labels[i]) for i in order[:RT_TEST]],
                 "dev": [(test_texts[i], test_labels[i]) for i in order[RT_TEST : RT_TEST + RT_DEV]]}
        files = {k: args.work / f"20ng-{k}.jsonl" for k in parts}
        for k, rows in parts.items():
            files[k].write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
        return {**files, "profile": profile}
    if args.task == "speakers":
        parts = speaker_lines()
        files = {k: args.work / f"speakers-{k}.jsonl" for k in parts}
        for k, rows in parts.items():
            files[k].write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
        return {**files, "profile": profile}
    if args.task in ("rt-prompt", "rt"):
        return {**write_rt_split(args.work), "profile": profile}
    plays = assets.shakespeare()
    tok = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    files = {"train": args.work / "train.jsonl", "dev": args.work / "dev.jsonl", "test": args.work / "test.jsonl"}
    files["train"].write_text("".join(json.dumps({"text": plays[p]}) + "\n" for p in TRAIN_PLAYS))
    files["dev"].write_text(json.dumps({"text": _cut(plays[DEV_PLAY], tok, 128 * args.dev_windows)}) + "\n")
    files["test"].write_text(json.dumps({"text": _cut(plays[TEST_PLAY], tok, args.test_tokens)}) + "\n")
    files["profile"] = profile
    return files




def write_rt_split(work: Path) -> dict[str, Path]:
    """Rotten Tomatoes as every benchmark splits it: RT_TEST test, RT_DEV dev, the rest for training draws;
    WORK/rt-{test,dev,train}.jsonl."""
    import numpy as np

    from edgeft import assets

    texts, labels = assets.rotten_tomatoes()
    order = np.random.default_rng(RT_SEED).permutation(len(texts))
    parts = {"test": order[:RT_TEST], "dev": order[RT_TEST : RT_TEST + RT_DEV], "train": order[RT_TEST + RT_DEV :]}
    work.mkdir(parents=True, exist_ok=True)
    files = {k: work / f"rt-{k}.jsonl" for k in parts}
    for k, rows in parts.items():
        files[k].write_text("".join(json.dumps({"text": texts[i], "label": labels[i]}) + "\n" for i in rows))
    return files


def speaker_lines() -> dict[str, list[tuple[str, str]]]:
    """(line, speaker) rows of SPEAKERS_PLAY's SPEAKERS most talkative characters: whole speeches, shuffled,
    fill the test set (RT_TEST lines), then dev (RT_DEV), then the training pool, so that no speech is
    split between them."""
    from collections import Counter

    import numpy as np

    from edgeft import assets

    speeches = assets.speeches(assets.shakespeare()[SPEAKERS_PLAY])
    lines_of = [(who, [l for l in text.split("\n") if len(l.split()) >= SPEAKERS_MIN_WORDS]) for who, text in speeches]
    counts = Counter()
    for who, lines in lines_of:
        counts[who] += len(lines)
    chosen = {who for who, _ in counts.most_common(SPEAKERS)}
    kept = [(who, lines) for who, lines in lines_of if who in chosen and lines]
    parts = {"test": [], "dev": [], "train": []}
    for i in np.random.default_rng(RT_SEED).permutation(len(kept)):
        who, lines = kept[i]
        part = "test" if len(parts["test"]) < RT_TEST else "dev" if len(parts["dev"]) < RT_DEV else "train"
        parts[part] += [(line, who) for line in lines]
    parts["test"], parts["dev"] = parts["test"][:RT_TEST], parts["dev"][:RT_DEV]
    return parts


def run_one(args, files, line: str, seed: int) -> dict:
    out = RUNS / f"{args.task}-{line}-seed{seed}.json"
    if args.resume and out.is_file():
        return json.loads(out.read_text())
    run_dir = args.work / f"{args.task}-{line}-seed{seed}"
    if line == "backprop" and args.task in CLASSIFICATION:
        return _classifier_backprop_run(args, files, seed, out)
    if line in ("backprop", "backprop-10m"):
        return _backprop_run(args, files, seed, out, seconds=TIME_BUDGET_S if line.endswith("-10m") else None)
    common = [args.bundle, "--data", files["train"], "--eval-data", files["dev"], "-o", run_dir, "--overwrite",
              "--seed", seed, "--device", files["profile"], "--eval-every", 25]
    if args.task == "rt-prompt":  # 16 per label, the whole set as the batch (the default for small sets)
        common += ["--k-shot", 16, "--batch-size", 32]
        settings = {"mezo": ["--optimizer", "mezo", "--output-fit-steps", 0, "--budget", f"{args.budget}fwd"],
                    "probe": ["--optimizer", "auto", "--budget", "1fwd"],
                    "auto-10m": ["--optimizer", "auto", "--budget", f"{TIME_BUDGET_S}s"],
                    "auto-nodev-10m": ["--optimizer", "auto", "--budget", f"{TIME_BUDGET_S}s"]}[line]
        if line == "auto-nodev-10m":  # as a user without a dev set runs it: the fit keeps its last point, uncalibrated
            at = common.index("--eval-data")
            del common[at : at + 2]
        return _finish(args, files, line, seed, out, run_dir, common, settings)
    if args.task in CLASSIFICATION and line == "probe":
        return _probe_run(args, files, seed, out, run_dir)
    if args.task in CLASSIFICATION and line == "mezo+refit":
        return _probe_run(args, files, seed, out, run_dir, body=args.work / f"{args.task}-mezo-seed{seed}" / "adapter")
    if args.task in CLASSIFICATION:  # 20ng: 320 examples in batches of 32; rt, speakers: the whole set per step
        common += ["--k-shot", 16, "--batch-size", CLASSIFICATION_BATCH[args.task]]
        if line.startswith("auto-nodev"):  # as a user without a dev set runs it: the fit keeps its last point
            at = common.index("--eval-data")
            del common[at : at + 2]
        name, _, lr = line.removesuffix("-10m").removesuffix("-nodev").partition("@")
        budget = f"{TIME_BUDGET_S}s" if line.endswith("-10m") else f"{args.budget}fwd"
        settings = ["--optimizer", name, "--budget", budget, *(["--lr", lr] if lr else [])]
        return _finish(args, files, line, seed, out, run_dir, common, settings)
    common += ["--batch-size", args.batch_size]
    settings = {"mezo": ["--optimizer", "mezo", "--output-fit-steps", 0, "--budget", f"{args.budget}fwd"],
                "fzoo": ["--optimizer", "fzoo", "--output-fit-steps", 0, "--budget", f"{args.budget}fwd"],
                "fit-only": ["--optimizer", "auto", "--output-fit-steps", args.fit_steps, "--budget", f"{args.fit_steps}fwd"],
                "fit+mezo": ["--optimizer", "auto", "--output-fit-steps", args.fit_steps, "--budget", f"{args.budget}fwd"],
                "auto": ["--optimizer", "auto", "--budget", f"{args.budget}fwd"],
                "auto-heldback": ["--optimizer", "auto", "--budget", f"{args.budget}fwd"],
                "auto-heldback-10m": ["--optimizer", "auto", "--budget", f"{TIME_BUDGET_S}s"]}[line]
    if line.startswith("auto-heldback"):  # no dev play: the run ranks on windows it holds back from the training text
        at = common.index("--eval-data")
        del common[at : at + 2]
    return _finish(args, files, line, seed, out, run_dir, common, settings)


def _finish(args, files, line, seed, out, run_dir, common, settings) -> dict:
    started = time.perf_counter()
    summary = edgeft_json("train", *common, *settings)
    test = edgeft_json("eval", args.bundle, "--data", files["test"], "--adapter", run_dir / "adapter", "--device", files["profile"])
    sampled = (edgeft_json("eval", args.bundle, "--data", files["test"], "--adapter", run_dir / "adapter", "--device",
                       files["profile"], "--samples", SAMPLES) if line.startswith("monteclora") else None)
    curve = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in r]
    record = {"line": line, "seed": seed, "budget_fwd": args.budget, "batch_size": args.batch_size,
              "train": {k: summary.get(k) for k in ("steps", "forward_passes", "wall_s", "elapsed_s", "peak_rss_mb",
                                                     "best_step", "forward_passes_to_best", "elapsed_s_to_best",
                                                     "output_fit", "optimizer", "recipe", "start", "best")},
              "test": test, "test_sampled": sampled, "dev_curve": [{"step": r["step"], "loss": r["eval"]["loss"]} for r in curve],
              "run_s": round(time.perf_counter() - started, 1)}
    RUNS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"  done {args.task} {line} seed {seed}: test {_score_text(test)} "
          f"({record['train']['forward_passes']} fwd, {record['run_s']:.0f} s)", flush=True)
    return record


PROBE_START = """
import shutil, sys, tempfile
from pathlib import Path
from edgeft.adapters import HEAD_WEIGHTS, save_adapter
from edgeft.data import k_shot, load_dataset
from edgeft.runtime import Bundle, starting_adapter
bundle_dir, data, seed, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
body = None
if len(sys.argv) > 5:  # a trained adapter without its head: the probe is refitted on its features
    body = Path(tempfile.mkdtemp()) / "body"
    shutil.copytree(sys.argv[5], body)
    (body / HEAD_WEIGHTS).unlink()
b = Bundle(bundle_dir)
shots = k_shot(load_dataset(data, b.labels), 16, seed)
vector, _ = starting_adapter(b, b.encode(shots.texts, shots.labels), seed, init_adapter=body)
save_adapter(out, b.layout, vector, b.manifest.peft_base.get("source", ""), None)
"""


def _probe_run(args, files, seed: int, out: Path, run_dir: Path, body: Path | None = None) -> dict:
    """A classification run's start for this seed (k-shot draw, LoRA init and linear-probe head as
    ``edgeft train`` makes them), saved untrained and scored on the test set; with ``body`` (a trained
    adapter: line mezo+refit) the head is refitted on that adapter's features instead (one LP-FT alternation)."""
    if body is not None and not body.is_dir():
        raise RuntimeError(f"{body}: run the mezo line first (mezo+refit refits its head)")
    run_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", PROBE_START, str(args.bundle), str(files["train"]), str(seed),
                    str(run_dir / "adapter"), *([str(body)] if body else [])], check=True)
    test = edgeft_json("eval", args.bundle, "--data", files["test"], "--adapter", run_dir / "adapter", "--device", files["profile"])
    record = {"line": "probe" if body is None else "mezo+refit", "seed": seed, "budget_fwd": args.budget, "batch_size": 32, "test": test,
              "train": {"forward_passes": 10 if args.task == "20ng" else 1, "elapsed_s": 0.0,
                        "peak_rss_mb": None}}  # one pass over the k-shot set (20ng: 320 examples in batches of 32)
    RUNS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def _backprop_run(args, files, seed: int, out: Path, seconds: float | None = None) -> dict:
    prompt = args.task == "rt-prompt"  # the whole k-shot set per step, the prompt's loss (learning_backprop.py --prompt)
    cmd = [sys.executable, Path(__file__).with_name("learning_backprop.py"), "--bundle", args.bundle, "--work", args.work,
           "--seed", seed, *(["--prompt", "--lr", PROMPT_BACKPROP_LR] if prompt else ["--batch-size", args.batch_size]),
           *(["--steps", 10**6, "--seconds", seconds] if seconds else ["--steps", args.backprop_steps])]
    started = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"backprop worker failed: {result.stderr.strip().splitlines()[-3:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record.update(line="backprop-10m" if seconds else "backprop", seed=seed, budget_fwd=args.budget,
                  batch_size=32 if prompt else args.batch_size, run_s=round(time.perf_counter() - started, 1))
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"  done backprop seed {seed}: test {_score_text(record['test'])}", flush=True)
    return record


def _classifier_backprop_run(args, files, seed: int, out: Path) -> dict:
    """peft LoRA on q, v of every layer + the probe head (trial_top_ffn.py head+qvall) on this seed's k-shot
    draw of the same files, in its own process."""
    cmd = [sys.executable, Path(__file__).with_name("trial_top_ffn.py"), "head+qvall", "--seed", seed, "--data-prefix",
           args.work / args.task, "--steps", args.backprop_steps, "--batch-size", CLASSIFICATION_BATCH[args.task]]
    started = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"backprop worker failed: {result.stderr.strip().splitlines()[-3:]}")
    trial = json.loads(result.stdout.strip().splitlines()[-1])
    record = {"line": "backprop", "seed": seed, "budget_fwd": args.budget, "batch_size": CLASSIFICATION_BATCH[args.task],
              "test": {"accuracy": trial["test_accuracy"], "loss": trial["test_loss"]},
              "train": {"forward_passes": trial["steps"], "best_step": trial["kept_step"], "elapsed_s": trial["wall_s"],
                        "peak_rss_mb": trial["peak_rss_mb"]},
              "curve": trial["curve"], "run_s": round(time.perf_counter() - started, 1)}
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"  done {args.task} backprop seed {seed}: test accuracy {record['test']['accuracy']:.3f}", flush=True)
    return record


def _score_text(metrics: dict) -> str:
    return f"perplexity {metrics['perplexity']:.2f}" if "perplexity" in metrics else f"accuracy {metrics['accuracy']:.3f}"


def start_record(args, files) -> dict:
    out = RUNS / f"{args.task}-start.json"
    if args.resume and out.is_file():
        return json.loads(out.read_text())
    test = edgeft_json("eval", args.bundle, "--data", files["test"], "--device", files["profile"])
    record = {"line": "start", "test": test}
    RUNS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def main(argv=None) -> None:
    global DOCS, RUNS
    args = parse_args(argv)
    DOCS, RUNS = args.docs, args.docs / "learning-runs"
    if args.render_only:
        render(DOCS)
        return
    if args.bundle is None:
        raise SystemExit("--bundle is required")
    files = prepare(args)
    if args.task not in CLASSIFICATION:  # a classifier's start is its probe line (a zero head would score chance)
        start_record(args, files)
    seeds = [int(s) for s in args.seeds.split(",")]
    runnable = [l for l in LINES[args.task] if l not in HISTORICAL]
    lines = [l for l in (args.lines or ",".join(runnable)).split(",") if l]
    unknown = sorted(set(lines) - set(runnable))
    if unknown:
        raise SystemExit(f"--lines: {', '.join(unknown)} not runnable lines of {args.task} ({', '.join(runnable)})")
    jobs = [(line, seed) for seed in seeds for line in lines]
    with ThreadPoolExecutor(args.workers) as pool:
        for future in [pool.submit(run_one, args, files, line, seed) for line, seed in jobs]:
            future.result()
    render(DOCS)


if __name__ == "__main__":
    main()
