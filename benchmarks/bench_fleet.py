"""A fleet against central training at the same forward passes (issue 15; first rows).

    python benchmarks/bench_fleet.py --bundle SMOLLM2_LM_BUNDLE [--clients 10 --rounds 5 --local-steps 2]

SmolLM2-135M causal LM; the clients are the speaking characters with the most speeches in three tragedies
(Hamlet, Othello, King Lear: one client per character, ``--partition by-field:speaker``); perplexity on the
first 8,192 tokens of Macbeth (as bench_learning.py). Lines:

  start     the base model
  fleet     ``edgeft fleet simulate``: every client each round, LOCAL_STEPS two-sided ZO steps of batch 4,
            seeds and scalars on the wire, the default lr (fixed at round 0 to MeZO's default step)
  fedavg    the usual way: the same clients and local steps, the whole LoRA adapter up and down every round,
            averaged by Flower's FedAvg (``--method fedavg``)
  central   ``edgeft train --optimizer mezo --output-fit-steps 0`` on all the clients' speeches pooled, batch 4,
            the same total training forward passes (clients × rounds × local steps × 2)

Per-run JSON in docs/fleet-runs/; the table to docs/FLEET.md (below its hand-written part, docs/fleet-notes.md).
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


def run(args, files, line: str) -> dict:
    tag = f"{line}-c{args.clients}-r{args.rounds}-s{args.local_steps}"
    out = RUNS / f"{tag}.json"
    if args.resume and out.is_file():
        return json.loads(out.read_text())
    started = time.perf_counter()
    run_dir = args.work / tag
    passes = args.clients * args.rounds * args.local_steps * 2
    if line == "start":
        test, summary = edgeft_json("eval", args.bundle, "--data", files["test"], "--device", files["profile"]), {}
    elif line in ("fleet", "fedavg"):
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        summary = edgeft_json("fleet", "simulate", args.bundle, "--data", files["train"], "--clients", args.clients,
                          "--partition", "by-field:speaker", "--rounds", args.rounds, "--local-steps", args.local_steps,
                          "--eval-data", files["dev"], "-o", run_dir, "--method", "seeds" if line == "fleet" else "fedavg")
        summary["rounds_log"] = [json.loads(l) for l in (run_dir / "rounds.jsonl").read_text().splitlines()]
        test = edgeft_json("eval", args.bundle, "--data", files["test"], "--adapter", run_dir / "adapter", "--device", files["profile"])
    else:
        summary = edgeft_json("train", args.bundle, "--data", files["train"], "-o", run_dir, "--overwrite", "--optimizer", "mezo",
                          "--output-fit-steps", 0, "--budget", f"{passes}fwd", "--batch-size", 4, "--device", files["profile"],
                          "--eval-data", files["dev"])
        test = edgeft_json("eval", args.bundle, "--data", files["test"], "--adapter", run_dir / "adapter", "--device", files["profile"])
    record = {"line": line, "clients": args.clients, "rounds": args.rounds, "local_steps": args.local_steps,
              "training_forward_passes": 0 if line == "start" else passes, "test": test, "summary": summary,
              "run_s": round(time.perf_counter() - started, 1)}
    RUNS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"  done {tag}: test perplexity {test['perplexity']:.2f} ({record['run_s']:.0f} s)", flush=True)
    return record


def render() -> None:
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    rows = ["| line | clients | rounds × local steps | training fwd | test perplexity | up B / client / round (max) | "
            "down B / client / round (max) | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["summary"]
        rows.append(f"| {r['line']} | {r['clients'] if r['line'] != 'start' else '–'} | {r['rounds']} × {r['local_steps']} | "
                    f"{r['training_forward_passes']} | {r['test']['perplexity']:.2f} | "
                    f"{s.get('upload_bytes_per_client_round_max', '–')} | {s.get('download_bytes_per_client_round_max', '–')} | "
                    f"{r['run_s']:.0f} |")
    text = "# Fleets (issue 15)\n\n" + __doc__.split("\n\n", 1)[1] + "\n" + "\n".join(rows) + "\n"
    notes = DOCS / "fleet-notes.md"
    if notes.is_file():
        text = "# Fleets (issue 15)\n\n" + notes.read_text() + "\n## Fleet against central training\n\n" + \
            __doc__.split("\n\n", 1)[1] + "\n" + "\n".join(rows) + "\n"
    (DOCS / "FLEET.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-fleet"))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--lines", default="start,fleet,fedavg,central")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    if not args.render_only:
        files = prepare(args)
        for line in args.lines.split(","):
            run(args, files, line)
    render()


if __name__ == "__main__":
    main()
