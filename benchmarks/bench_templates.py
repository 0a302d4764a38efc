"""Does choosing the prompt template on dev data pay on test data? (issue 12 §4, prompt templates)

    python benchmarks/bench_templates.py --work DIR [--resume]

SmolLM2-135M prompt mode on Rotten Tomatoes, split as bench_learning.py splits it (1,000 test snippets,
200 dev). One `edgeft export --template ... --template-data rt-dev.jsonl` with TEMPLATES: export scores
each candidate zero-shot on dev and keeps the best. This script then scores every candidate zero-shot
on the 1,000 test snippets, the same way (the bundle's graph is the same for every template: the
template shapes the text only), so the table shows what the dev choice bought against the user's first
candidate and against the best in hindsight. Results: docs/template-runs/rt.json, docs/TEMPLATES.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from common import machine_facts  # benchmarks/ is on sys.path when run as a script
from bench_learning import write_rt_split  # bench_learning.py's Rotten Tomatoes split

DOCS = Path(__file__).resolve().parents[1] / "docs"
TEMPLATES = [
    "Review: {text}\nSentiment (positive or negative):",  # the demo's, and bench_learning's
    "{text}\nWas this movie review positive or negative? Answer:",
    "Movie review: {text}\nThe critic's verdict on the film is",
    "{text}\nQuestion: is the review above positive or negative?\nAnswer:",
]
VERBALIZER = "rotten=negative,fresh=positive"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="reuse the exported bundle")
    args = p.parse_args()
    from edgeft import assets

    files = write_rt_split(args.work)

    bundle = args.work / "smollm2-templates"
    log = args.work / "export.log"
    if not (args.resume and (bundle / "edgeft.json").is_file()):
        gguf = assets.smollm2_gguf()
        cmd = [sys.executable, "-m", "edgeft.cli", "export", str(gguf.parent), "--gguf-file", gguf.name, "-o", str(bundle),
               "--task", "prompt", "--labels", "rotten,fresh", "--verbalizer", VERBALIZER, "--template-data",
               str(files["dev"]), "--no-verify"] + [a for t in TEMPLATES for a in ("--template", t)]
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        log.write_text(result.stdout + result.stderr + f"\nexport wall s: {time.perf_counter() - started:.0f}\n")
        if result.returncode != 0:
            raise SystemExit(f"export failed: {result.stderr.strip().splitlines()[-1]}")
    dev = {}
    for line in log.read_text().splitlines():
        found = re.match(r"template (['\"].*['\"]): zero-shot accuracy ([\d.]+), loss ([\d.]+)", line)
        if found:
            dev[ast.literal_eval(found[1])] = {"accuracy": float(found[2]), "loss": float(found[3])}

    from edgeft.data import load_dataset
    from edgeft.manifest import Manifest
    from edgeft.runtime import Bundle
    from edgeft.runtime.evaluate import evaluate

    chosen = Manifest.load(bundle).template
    b = Bundle(bundle)
    test = load_dataset(files["test"], b.labels)
    rows = []
    for template in TEMPLATES:
        b.manifest.template = template
        started = time.perf_counter()
        metrics = evaluate(b, b.layout.initial(0), b.encode(test.texts, test.labels), 16)
        rows.append({"template": template, "dev": dev.get(template), "test": {"accuracy": metrics["accuracy"],
                     "loss": metrics["loss"]}, "test_s": round(time.perf_counter() - started, 1)})
        print(f"{template!r}: test accuracy {metrics['accuracy']:.3f}", flush=True)
    record = {"chosen": chosen, "rows": rows, "machine": machine_facts(("onnxruntime", "numpy"))}
    (DOCS / "template-runs").mkdir(parents=True, exist_ok=True)
    (DOCS / "template-runs" / "rt.json").write_text(json.dumps(record, indent=1) + "\n")
    render(record)


def render(record: dict) -> None:
    rows = record["rows"]
    first, chosen = rows[0], next(r for r in rows if r["template"] == record["chosen"])
    best = max(rows, key=lambda r: r["test"]["accuracy"])
    table = ["| template | dev accuracy (200) | dev loss | test accuracy (1,000) | test loss |", "|---|---|---|---|---|"]
    for r in rows:
        mark = " **(kept)**" if r is chosen else ""
        d = r["dev"] or {}
        table.append(f"| `{json.dumps(r['template'])[1:-1]}`{mark} | {d.get('accuracy', float('nan')):.1%} | "
                     f"{d.get('loss', float('nan')):.4f} | {r['test']['accuracy']:.1%} | {r['test']['loss']:.4f} |")
    text = f"""# Choosing a prompt template on dev data (issue 12 §4)

`python benchmarks/bench_templates.py --work DIR` — SmolLM2-135M prompt mode on Rotten Tomatoes (labels rotten/fresh,
words " negative"/" positive"), untrained (zero-shot). `edgeft export --template ... --template-data rt-dev.jsonl`
scored each candidate on the 200 dev snippets and kept the best (accuracy, then loss); every candidate is then scored on
the 1,000 test snippets of bench_learning.py's split (standard error ≈ 1.5 points). Raw: `docs/template-runs/rt.json`.

{chr(10).join(table)}

Kept on dev vs the first candidate (the template a user would otherwise export with): {100 * (chosen['test']['accuracy'] - first['test']['accuracy']):+.1f} points on test;
vs the best candidate in hindsight: {100 * (chosen['test']['accuracy'] - best['test']['accuracy']):+.1f} points.
Cost: {len(rows)} × 200 dev forward passes at export, no training.
"""
    (DOCS / "TEMPLATES.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
