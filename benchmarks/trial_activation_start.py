"""Trial: LoRA's A started at the top principal directions of each layer's inputs, then MeZO.

    python benchmarks/trial_activation_start.py --task 20ng --bundle MINILM_20NG --work WORK --seeds 0,1,2

A linear layer's weight gradient is δ·xᵀ, so a LoRA update B·A can only follow it through the input
directions A spans. PEFT's random A spans 8 of 384 directions at random; MiniLM's top 8 principal
directions of a layer's inputs carry 16-39% of their energy (8/384 = 2% for random ones). Started there
(B = 0, so the model is unchanged), MeZO's perturbations of B move the layer's output along the inputs'
dominant directions. The init adapter (A at the PCs, scaled to the row norm of PEFT's kaiming init, and
the seed's linear-probe head as ``edgeft train`` makes it) is passed to ``edgeft train --init-adapter``; WORK holds bench_learning's
data files (run it once for the task first). One JSON per run in docs/activation-trial/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import edgeft_json  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "activation-trial"

MAKE_START = """
import sys
import numpy as np
from edgeft.adapters import save_adapter
from edgeft.data import k_shot, load_dataset
from edgeft.runtime import Bundle, starting_adapter
from edgeft.runtime.statistics import layer_input_bases
bundle_dir, data, seed, out, scale, kshot = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), int(sys.argv[6])
b = Bundle(bundle_dir)
shots = k_shot(load_dataset(data, b.labels), kshot, seed)
enc = b.encode(shots.texts, shots.labels)
vector, _ = starting_adapter(b, enc, seed)
named = b.layout.unflatten(vector)
rank = b.manifest.adapter.rank
bases = layer_input_bases(b, enc, rank, limit=len(enc))
from edgeft.adapters import layer_of
for t in b.layout.tensors:
    if t.role == "lora_A" and t.module.split(".")[-1] in ("query", "key", "value"):
        u, _ = bases[layer_of(t.name)]
        named[t.name][...] = u.T * scale
save_adapter(out, b.layout, vector, b.manifest.peft_base.get("source", ""), None)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="20ng")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=200)
    p.add_argument("--scale", type=float, default=3 ** -0.5, help="row norm of A (PEFT's kaiming init: 1/sqrt(3))")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", default="mezo")
    p.add_argument("--name", default="mezo+pca-start")
    a = p.parse_args()
    files = {k: a.work / f"{a.task}-{k}.jsonl" for k in ("train", "dev", "test")}
    profile = a.work / "one-thread.toml"
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in map(int, a.seeds.split(",")):
        out = OUT / f"{a.task}-{a.name}-seed{seed}.json"
        if out.is_file():
            continue
        run = a.work / f"{a.task}-{a.name}-seed{seed}"
        start = run.with_name(run.name + "-start")
        subprocess.run([sys.executable, "-c", MAKE_START, str(a.bundle), str(files["train"]), str(seed), str(start),
                        str(a.scale), "16"], check=True)
        summary = edgeft_json("train", a.bundle, "--data", files["train"], "--eval-data", files["dev"], "-o", run,
                              "--overwrite", "--seed", seed, "--device", profile, "--eval-every", 25, "--k-shot", 16,
                              "--batch-size", a.batch_size, "--optimizer", a.optimizer, "--budget", f"{a.budget}fwd",
                              "--init-adapter", start)
        test = edgeft_json("eval", a.bundle, "--data", files["test"], "--adapter", run / "adapter", "--device", profile)
        curve = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in r]
        record = {"line": a.name, "seed": seed, "scale": a.scale, "test": test,
                  "train": {k: summary.get(k) for k in ("forward_passes", "elapsed_s", "peak_rss_mb", "best_step")},
                  "dev_curve": [{"step": r["step"], "loss": r["eval"]["loss"], "accuracy": r["eval"].get("accuracy")} for r in curve]}
        out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"seed {seed}: test {test['accuracy']:.3f} loss {test['loss']:.4f}; dev "
              + " ".join(f"{c['loss']:.4f}" for c in record["dev_curve"]), flush=True)


if __name__ == "__main__":
    main()
