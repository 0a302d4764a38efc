"""A fleet against central training at the same forward passes, and against FedAvg (issue 15).

    python benchmarks/bench_fleet.py --bundle SMOLLM2_LM_BUNDLE [--clients 10 --rounds 5 --local-steps 2]
    python benchmarks/bench_fleet.py --task 20ng --bundle MINILM_20NG_BUNDLE [--clients 10 --rounds 10 --local-steps 4]

Task shakespeare: SmolLM2-135M causal LM; the clients are the speaking characters with the most speeches in
three tragedies (Hamlet, Othello, King Lear: one client per character, ``--partition by-field:speaker``);
perplexity on the first 8,192 tokens of Macbeth (as bench_learning.py). Lines:

  start     the base model
  fleet     ``edgeft fleet simulate``: every client each round, LOCAL_STEPS two-sided ZO steps of batch 4,
            seeds and scalars on the wire, the default lr (fixed at round 0 to MeZO's default step)
  fedavg    the usual way: the same clients and local steps, the whole LoRA adapter up and down every round,
            averaged by Flower's FedAvg (``--method fedavg``)
  central   ``edgeft train --optimizer mezo --output-fit-steps 0`` on all the clients' speeches pooled, batch 4,
            the same total training forward passes (clients × rounds × local steps × 2)

Task 20ng: all-MiniLM-L6-v2 classification of 20 Newsgroups (LoRA r=8 on q/v + head); --per-label examples per
label of the training split pooled, dealt to the clients with a Dirichlet 0.3 label skew
(``--partition dirichlet:0.3``); 200 examples of the test split are the server's per-round dev score, accuracy
on 1,000 others (the split bench_learning.py uses). Lines:

  fleet     as above, from the fleet's own start: the class-mean head the devices fit together (fleet/start.py);
            also its best round on the dev data (RUN/best-adapter, kept as edgeft train keeps its best step)
  start     that shared start alone (RUN/start of the fleet run), untrained
  probe     what one device holding all the pooled rows starts from: ``edgeft train``'s linear probe (1 pass)
  central   ``edgeft train --optimizer mezo --init-adapter FLEET/start`` on the pooled rows, batch 4, the
            fleet's training forward passes: the same start, so fleet − central is what federating cost
  fedavg    FedAvg of the whole adapter through Flower from the same start, the same local steps

Per-run JSON in docs/fleet-runs/; the tables to docs/FLEET.md (below its hand-written part, docs/fleet-notes.md),
with the download a device joining late needs (the history of pairs, from the fleet run's state).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import edgeft_json  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNS = DOCS / "fleet-runs"
PLAYS = ("tragedies/hamlet", "tragedies/othello", "tragedies/king-lear")




def prepare(args) -> dict:
    return prepare_20ng(args) if args.task == "20ng" else prepare_shakespeare(args)


def prepare_20ng(args) -> dict:
    import numpy as np

    from edgeft import assets

    sys.path.insert(0, str(Path(__file__).parent))
    from learning_report import RT_DEV, RT_SEED, RT_TEST

    texts, labels = assets.newsgroups("train")
    test_texts, test_labels = assets.newsgroups("test")
    rng = np.random.default_rng(0)
    pool = np.concatenate([rng.choice(np.flatnonzero(np.array(labels) == name), args.per_label, replace=False)
                           for name in sorted(set(labels))])
    order = np.random.default_rng(RT_SEED).permutation(len(test_texts))  # as bench_learning.py's 20ng split
    parts = {"train": [(texts[i], labels[i]) for i in np.sort(pool)],
             "test": [(test_texts[i], test_labels[i]) for i in order[:RT_TEST]],
             "dev": [(test_texts[i], test_labels[i]) for i in order[RT_TEST:RT_TEST + RT_DEV]]}
    args.work.mkdir(parents=True, exist_ok=True)
    files = {k: args.work / f"20ng-{k}.jsonl" for k in parts}
    for k, rows in parts.items():
        files[k].write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    files["profile"] = args.work / "one-thread.toml"
    files["profile"].write_text('name = "bench-one-thread"\nthreads = 1\nbatch_size = 4\nmax_length = 128\n')
    return files


def prepare_shakespeare(args) -> dict:
    from collections import Counter

    from tokenizers import Tokenizer

    from edgeft import assets

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_learning import _cut

    plays = assets.shakespeare()
    rows = [(f"{play.split('/')[1]}:{who}", text) for play in PLAYS for who, text in assets.speeches(plays[play])]
    top = {who for who, _ in Counter(w for w, _ in rows).most_common(args.clients)}
    args.work.mkdir(parents=True, exist_ok=True)
    files = {"train": args.work / "speeches.jsonl", "dev": args.work / "dev.jsonl", "test": args.work / "test.jsonl",
             "profile": args.work / "one-thread.toml"}
    files["train"].write_text("".join(json.dumps({"text": t, "speaker": w}) + "\n" for w, t in rows if w in top))
    tok = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    files["dev"].write_text(json.dumps({"text": _cut(plays["tragedies/romeo-and-juliet"], tok, 1024)}) + "\n")
    files["test"].write_text(json.dumps({"text": _cut(plays["tragedies/macbeth"], tok, 8192)}) + "\n")
    files["profile"].write_text('name = "bench-one-thread"\nthreads = 1\nbatch_size = 4\nmax_length = 128\n')
    return files


def _tag(args, line: str) -> str:
    tag = f"{line}-c{args.clients}-r{args.rounds}-s{args.local_steps}"
    return tag if args.task == "shakespeare" else f"{args.task}-{tag}"


def run(args, files, line: str) -> dict:
    tag = _tag(args, line)
    out = RUNS / f"{tag}.json"
    if args.resume and out.is_file():
        return json.loads(out.read_text())
    started = time.perf_counter()
    run_dir = args.work / tag
    fleet_start = args.work / _tag(args, "fleet") / "start"  # 20ng: the shared start every line but probe uses
    passes = args.clients * args.rounds * args.local_steps * 2
    partition = "dirichlet:0.3" if args.task == "20ng" else "by-field:speaker"
    shared = ["--init-adapter", fleet_start] if args.task == "20ng" else []
    evaluate = ("eval", args.bundle, "--data", files["test"], "--device", files["profile"])
    if line == "start" and args.task == "20ng":
        test, summary = edgeft_json(*evaluate, "--adapter", fleet_start), {}
    elif line == "start":
        test, summary = edgeft_json(*evaluate), {}
    elif line == "probe":
        summary = edgeft_json("train", args.bundle, "--data", files["train"], "-o", run_dir, "--overwrite", "--optimizer",
                              "auto", "--budget", "1fwd", "--batch-size", 32, "--device", files["profile"])
        test = edgeft_json(*evaluate, "--adapter", run_dir / "adapter")
    elif line in ("fleet", "fedavg"):
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        summary = edgeft_json("fleet", "simulate", args.bundle, "--data", files["train"], "--clients", args.clients,
                              "--partition", partition, "--rounds", args.rounds, "--local-steps", args.local_steps,
                              "--eval-data", files["dev"], "-o", run_dir, "--method", "seeds" if line == "fleet" else "fedavg",
                              *(shared if line == "fedavg" else []))
        summary["rounds_log"] = [json.loads(l) for l in (run_dir / "rounds.jsonl").read_text().splitlines()]
        if line == "fleet":
            summary["late_join_bytes"] = late_join_bytes(run_dir / "state.json")
        test = edgeft_json(*evaluate, "--adapter", run_dir / "adapter")
        if (run_dir / "best-adapter").is_dir():  # the round that scored best on the dev data, as train keeps
            summary["test_best"] = edgeft_json(*evaluate, "--adapter", run_dir / "best-adapter")
    else:
        summary = edgeft_json("train", args.bundle, "--data", files["train"], "-o", run_dir, "--overwrite", "--optimizer", "mezo",
                              "--output-fit-steps", 0, "--budget", f"{passes}fwd", "--batch-size", 4, "--device", files["profile"],
                              "--eval-data", files["dev"], *shared)
        test = edgeft_json(*evaluate, "--adapter", run_dir / "adapter")
    record = {"task": args.task, "line": line, "clients": args.clients, "rounds": args.rounds, "local_steps": args.local_steps,
              "training_forward_passes": passes if line in ("fleet", "fedavg", "central") else 0, "test": test,
              "summary": summary, "run_s": round(time.perf_counter() - started, 1)}
    RUNS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"  done {tag}: test {_score(test)} ({record['run_s']:.0f} s)", flush=True)
    return record


def late_join_bytes(state_path: Path) -> list[int]:
    """Per round r, the bytes of the train message a device that joins before round r + 1 gets: the
    whole history of pairs up to r (what it replays instead of downloading the adapter)."""
    from edgeft.fleet.apps import _history_record, wire_bytes
    from edgeft.fleet.protocol import FleetState

    state = FleetState.load(state_path)
    return [wire_bytes({"round": r + 1, "node": 2**62, **_history_record(state.history[:r + 1], 0), "selected": True})
            for r in range(state.round)]


def _score(test: dict) -> str:
    return f"perplexity {test['perplexity']:.2f}" if "perplexity" in test else f"accuracy {100 * test['accuracy']:.1f}%"


def _table(records: list[dict]) -> list[str]:
    lm = "perplexity" in records[0]["test"]
    rows = [f"| line | clients | rounds × local steps | training fwd | test {'perplexity' if lm else 'accuracy'} | "
            "up B / client / round (max) | down B / client / round (max) | start up / down B (once) | wall s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s, test = r["summary"], r["test"]
        once = s.get("start") if r["line"] == "fleet" and isinstance(s.get("start"), dict) else {}
        cells = [r["line"], "–" if r["line"] in ("start", "probe") else r["clients"], f"{r['rounds']} × {r['local_steps']}",
                 r["training_forward_passes"], f"{test['perplexity']:.2f}" if lm else f"{100 * test['accuracy']:.1f}%",
                 s.get("upload_bytes_per_client_round_max", "–"), s.get("download_bytes_per_client_round_max", "–"),
                 f"{once['upload_bytes_max']} / {once['download_bytes_max']}" if once else "–", f"{r['run_s']:.0f}"]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
        if s.get("test_best"):
            kept = s["best"]["round"]
            best = s["test_best"]
            cells[0] = f"{r['line']}, best on dev ({'the start' if kept is None else f'round {kept + 1}'})"
            cells[4] = f"{best['perplexity']:.2f}" if lm else f"{100 * best['accuracy']:.1f}%"
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    for r in records:
        sizes = r["summary"].get("late_join_bytes")
        if sizes:
            rows += ["", f"Download of a device joining after round r ({r['clients']} clients; the history of pairs it "
                     "replays): " + ", ".join(f"r{i + 1}: {b:,} B" for i, b in enumerate(sizes)) + "."]
    return rows


def render() -> None:
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    order = ["start", "probe", "central", "fedavg", "fleet"]
    parts = []
    for task, title in (("shakespeare", "SmolLM2-135M, Shakespeare by character"), ("20ng", "MiniLM, 20 Newsgroups, Dirichlet 0.3")):
        mine = sorted((r for r in records if r.get("task", "shakespeare") == task),
                      key=lambda r: (r["clients"], r["rounds"], r["local_steps"], order.index(r["line"])))
        if mine:
            parts.append(f"### {title}\n\n" + "\n".join(_table(mine)) + "\n")
    body = __doc__.split("\n\n", 1)[1] + "\n" + "\n".join(parts)
    notes = DOCS / "fleet-notes.md"
    head = notes.read_text() + "\n## Fleet against central training\n\n" if notes.is_file() else ""
    text = "# Fleets (issue 15)\n\n" + head + body
    (DOCS / "FLEET.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("shakespeare", "20ng"), default="shakespeare")
    p.add_argument("--bundle", type=Path)
    p.add_argument("--per-label", type=int, default=80, help="20ng: training examples per label pooled over the clients")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-fleet"))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--lines", help="default: start,fleet,fedavg,central (20ng: fleet,start,probe,central,fedavg)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    if not args.render_only:
        files = prepare(args)
        lines = args.lines or ("fleet,start,probe,central,fedavg" if args.task == "20ng" else "start,fleet,fedavg,central")
        for line in lines.split(","):
            run(args, files, line)
    render()


if __name__ == "__main__":
    main()
