"""int8 deploy of MiniLM: which frozen weights stay fp32 (issue 14 §2: ≥ 97% agreement with fp32 at ≤ 0.4x
the file).

    python benchmarks/bench_int8_tables.py --work DIR [--resume]

all-MiniLM-L6-v2 classification on Rotten Tomatoes (bench_learning.py's split), the linear-probe start for
k = 16 per label (``edgeft train --budget 1fwd``, seed 0) merged with ``edgeft deploy --merge``. The merged fp32
graph is quantised by ``quantize_int8`` as deploy does, with: every MatMul int8, no embedding tables (the default
before session 13); every MatMul and the tables (session 13's default); the tables and every MatMul but the
feed-forward down projections (the default now); and ``edgeft deploy --merge --quantize int8`` itself. Rows:
file size against fp32; agreement of predicted labels with fp32 on the 1,000 test snippets and on the 11,608
snippets of the training pool (labels unused; the probe's 32 training texts are among them), where one
agreement figure's standard error is ≈ 0.16 points; test accuracy; milliseconds per snippet over the pool (one
ORT thread, batches of 32; taken beside other work on two shared cores: deploy's graph and the default row
are the same file, so their two timings show the noise). Results: docs/int8-tables-runs/minilm.json and docs/INT8-TABLES.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import machine_facts  # benchmarks/ is on sys.path when run as a script
from bench_learning import write_rt_split  # bench_learning.py's Rotten Tomatoes split

DOCS = Path(__file__).resolve().parents[1] / "docs"


def edgeft(*args) -> None:
    result = subprocess.run([sys.executable, "-m", "edgeft.cli", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"edgeft {args[0]} failed: {(result.stderr or result.stdout).strip().splitlines()[-1]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="reuse the bundle and the probe run")
    args = p.parse_args()
    import numpy as np

    from edgeft import assets

    work = args.work
    files = write_rt_split(work)
    bundle, run = work / "minilm-rt", work / "probe"
    if not (args.resume and (bundle / "edgeft.json").is_file()):
        subprocess.run(["rm", "-rf", str(bundle)], check=True)
        edgeft("export", assets.minilm_folder(), "-o", bundle, "--task", "classification", "--labels", "rotten,fresh")
    if not (args.resume and (run / "adapter").is_dir()):
        edgeft("train", bundle, "--data", files["train"], "--k-shot", 16, "--seed", 0, "-o", run, "--overwrite",
               "--budget", "1fwd", "--eval-data", files["dev"])
    merged, deployed8 = work / "merged", work / "merged-int8"
    subprocess.run(["rm", "-rf", str(merged), str(deployed8)], check=True)
    edgeft("deploy", bundle, "--adapter", run / "adapter", "-o", merged, "--merge")
    edgeft("deploy", bundle, "--adapter", run / "adapter", "-o", deployed8, "--merge", "--quantize", "int8")

    from edgeft.export.quantize import quantize_int8
    from edgeft.manifest import Manifest

    architecture = Manifest.load(bundle).architecture
    graphs = {"fp32": merged / "model.onnx", "deploy --quantize int8": deployed8 / "model.onnx"}
    for name, tables, keep in (("int8, all MatMuls", False, []), ("int8, all MatMuls + embedding tables", True, []),
                               ("int8, tables + MatMuls but FFN down projections (default)", True, None)):
        graphs[name] = work / f"{'tables' if tables else 'matmuls'}-{'all' if keep == [] else 'default'}.onnx"
        quantize_int8(graphs["fp32"], graphs[name], None, architecture=architecture, tables=tables, keep_fp32=keep)

    import onnxruntime as ort

    from edgeft.data import load_dataset
    from edgeft.runtime import Bundle
    from edgeft.runtime.evaluate import length_sorted_batches

    import time

    b = Bundle(bundle)
    test = load_dataset(files["test"], b.labels)
    pool = load_dataset(files["train"], b.labels)
    encoded = {"test": b.encode(test.texts, test.labels), "pool": b.encode(pool.texts, pool.labels)}

    def predictions(path: Path, which: str) -> tuple[np.ndarray, float]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        out = np.empty(len(encoded[which]), dtype=np.int64)
        started = time.perf_counter()
        for index in length_sorted_batches(encoded[which], 32):
            feeds = {k: v for k, v in b.feeds(encoded[which], index).items() if k in wanted}
            out[index] = session.run(["logits"], feeds)[0].argmax(-1)
        return out, (time.perf_counter() - started) / len(out)

    reference = {which: predictions(graphs["fp32"], which)[0] for which in encoded}
    rows = []
    for name, path in graphs.items():
        got, _ = predictions(path, "test")
        got_pool, seconds = predictions(path, "pool")
        rows.append({"graph": name, "bytes": path.stat().st_size, "x_fp32": path.stat().st_size / graphs["fp32"].stat().st_size,
                     "agreement": float((got == reference["test"]).mean()), "accuracy": float((got == test.labels).mean()),
                     "pool_agreement": float((got_pool == reference["pool"]).mean()), "ms_per_text": 1000 * seconds})
        print(json.dumps(rows[-1]), flush=True)
    record = {"rows": rows, "test_examples": len(test.texts), "pool_examples": len(pool.texts),
              "machine": machine_facts(("onnxruntime", "onnx", "numpy"))}
    (DOCS / "int8-tables-runs").mkdir(parents=True, exist_ok=True)
    (DOCS / "int8-tables-runs" / "minilm.json").write_text(json.dumps(record, indent=1) + "\n")
    table = ["| graph | file MB | x fp32 | agreement, 1,000 test | agreement, 11,608 pool | test accuracy | ms / text |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['graph']} | {r['bytes'] / 1e6:.1f} | {r['x_fp32']:.2f} | {r['agreement']:.1%} | {r['pool_agreement']:.1%} | "
              f"{r['accuracy']:.1%} | {r['ms_per_text']:.2f} |" for r in rows]
    text = ("# int8 deploy of MiniLM: what stays fp32 (issue 14 §2)\n\n" + __doc__.split("\n\n", 2)[2] +
            "\n" + "\n".join(table) + "\n")
    (DOCS / "INT8-TABLES.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
