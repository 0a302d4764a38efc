"""Layer-split evaluation: training step time with and without ``edgeft split``.

    python benchmarks/bench_split.py            # writes docs/SPLIT.md
    python benchmarks/bench_split.py --quick    # a few steps, to check that the script works

all-MiniLM-L6-v2 classification on Rotten Tomatoes (k=16 per class, 32 examples):

  layer-wise DFO (``dfo-layerwise``: one CMA-ES per layer, each generation changes one
  layer's adapters) on the usual bundle (LoRA q,v in all 6 layers), whole graph vs. the
  same bundle cut at layers 1-5;
  MeZO on a bundle with LoRA on the top two layers only (4, 5), whole graph vs. cut at 4.

Each case runs with the whole k-shot set as one batch (the lower part then runs once
per change of the adapters below the split) and with sampled batches of 16 (once per
step). Every variant runs in its own process, in rounds (A, B, A, B, ...), and the
table quotes the median step time over rounds; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine_facts  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache" / "split"
LABELS = ["rotten", "fresh"]
CASES = {  # name -> (bundle, optimizer, settings)
    # one generation per layer, so that the timed steps cover whole cycles over the 7 groups (6 layers + head);
    # popsize 8 keeps the whole-graph variant affordable (the split's saving per candidate does not depend on it)
    "layerwise": ("all-layers", "dfo-layerwise", {"generations_per_layer": 1, "popsize": 8}),
    "mezo-top2": ("top2", "mezo", {}),
}
LAYERWISE_STEPS = 7  # one cycle
BATCHES = {"whole set (32)": 32, "batches of 16": 16}
WARMUP = 3


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed MeZO steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="ORT intra-op threads; with 1, CPU time per step is a fair measure on a shared machine")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 6, 1
    return args


def prep() -> None:
    """Export the two bundles once and write their split copies."""
    from edgeft import assets
    from edgeft.export import ExportOptions, export_bundle
    from edgeft.export.split import split_bundle

    top2 = [f"layer.{i}.attention.self.{m}" for i in (4, 5) for m in ("query", "value")]
    for name, targets, cuts in (("all-layers", None, [1, 2, 3, 4, 5]), ("top2", top2, [4])):
        whole, split = CACHE / name, CACHE / f"{name}-split"
        if not (whole / "edgeft.json").is_file():
            options = ExportOptions(task="classification", labels=LABELS, max_length=128, targets=targets)
            export_bundle(str(assets.minilm_folder()), whole, options, log=lambda m: None)
        if not (split / "edgeft.json").is_file():
            shutil.rmtree(split, ignore_errors=True)
            shutil.copytree(whole, split)
            split_bundle(split, cuts)


def worker(spec: dict) -> dict:
    import numpy as np

    from edgeft import assets
    from edgeft.data import Dataset, k_shot
    from edgeft.runtime import Bundle, TrainConfig, Trainer, make_optimizer, starting_adapter
    from edgeft.runtime.devices import DeviceProfile

    bundle = Bundle(spec["bundle"], DeviceProfile(threads=spec["threads"]))
    texts, names = assets.rotten_tomatoes()
    data = k_shot(Dataset(texts, np.array([LABELS.index(n) for n in names])), 16, seed=0)
    train = bundle.encode(data.texts, data.labels)
    theta, _ = starting_adapter(bundle, train, 0, None)
    opt = make_optimizer(spec["optimizer"], theta, layout=bundle.layout, seed=0, total_steps=spec["steps"] + WARMUP,
                         **spec["settings"])
    trainer = Trainer(bundle, train, opt, TrainConfig(steps=spec["steps"] + WARMUP, batch_size=spec["batch"]))
    times, cpu, losses = [], [], []
    for _ in range(spec["steps"] + WARMUP):
        start, start_cpu = time.perf_counter(), time.process_time()
        losses.append(trainer.step().loss)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    timed = times[WARMUP:]
    return {"step_ms": 1000 * statistics.mean(timed), "cpu_ms": 1000 * statistics.mean(cpu[WARMUP:]), "passes_per_step": trainer.evaluator.forward_passes / len(times),
            "split_share": trainer.evaluator.split_passes / max(trainer.evaluator.forward_passes, 1),
            "final_loss": float(np.mean(losses[-5:])), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(args: list[str]) -> str:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"worker failed: {' '.join(args)}\n{out.stderr[-2000:]}")
    return out.stdout


def render(args, facts, results) -> str:
    lines = ["# Layer-split evaluation (`edgeft split`)", "",
             f"{facts['date']} · {facts['cpu']} · {facts['cores']} cores · load {facts['load'][0]:.2f} at start · "
             f"onnxruntime {facts['onnxruntime']} · `{facts['command']}`", "",
             f"MiniLM-L6 classification, Rotten Tomatoes k=16 per class (32 examples), linear-probe start, "
             f"{args.threads} ORT threads, mean step time over {args.steps} steps (layer-wise, one generation per layer: "
             f"{LAYERWISE_STEPS} steps = one cycle over the 6 layers and the head, popsize 8) after {WARMUP} warm-up; median over {args.rounds} "
             "rounds (each variant in its own process). Losses are the same with and without the split "
             "(tests/test_split.py checks ORT split vs whole graph at two shapes); final loss is shown as a check.", "",
             "CPU time per step (this process, one ORT thread) is the number to read when other work shares the "
             "machine; wall time is shown beside it.", "",
             "| case | batch | graph | CPU per step | speed-up (CPU) | wall per step | speed-up (wall) | forward passes/step | on split | peak RSS | final train loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in CASES:
        for batch_name in BATCHES:
            base = results[(case, batch_name, "whole")]
            for graph in ("whole", "split"):
                r = results[(case, batch_name, graph)]
                lines.append(f"| {case} | {batch_name} | {graph} | {r['cpu_ms']:.0f} ms | {base['cpu_ms'] / r['cpu_ms']:.2f}x | "
                             f"{r['step_ms']:.0f} ms | {base['step_ms'] / r['step_ms']:.2f}x | "
                             f"{r['passes_per_step']:.1f} | {r['split_share']:.0%} | {r['peak_rss_mb']:.0f} MB | {r['final_loss']:.4f} |")
    lines += ["", "The price is memory: the whole graph stays loaded for evaluation, the segments are loaded beside it, "
              "and each segment's outputs are cached for the batch. The segment sessions share one ORT arena "
              "(runtime/split.py); with one arena each, the layer-wise split run peaked at 810 MB instead of 578 MB."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    facts = machine_facts(("onnxruntime",))
    CACHE.mkdir(parents=True, exist_ok=True)
    # export in a child process too: the parent stays free of torch
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    "import bench_split; bench_split.prep()"], check=True)
    runs: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        for case, (bundle, optimizer, settings) in CASES.items():
            for batch_name, batch in BATCHES.items():
                for graph in ("whole", "split"):
                    folder = CACHE / (bundle if graph == "whole" else f"{bundle}-split")
                    spec = {"bundle": str(folder), "optimizer": optimizer, "batch": batch, "settings": settings,
                            "steps": LAYERWISE_STEPS if optimizer == "dfo-layerwise" else args.steps,
                            "threads": args.threads}
                    r = json.loads(spawn(["--worker", json.dumps(spec)]).strip().splitlines()[-1])
                    runs.setdefault((case, batch_name, graph), []).append(r)
                    print(f"round {round_ + 1}: {case:10s} {batch_name:15s} {graph:5s} {r['step_ms']:.0f} ms/step "
                          f"({r['cpu_ms']:.0f} ms CPU)", flush=True)
    results = {k: {**v[0], "step_ms": statistics.median(x["step_ms"] for x in v),
                   "cpu_ms": statistics.median(x["cpu_ms"] for x in v)} for k, v in runs.items()}
    report = render(args, facts, results)
    print(report)
    out = CACHE / "SPLIT-quick.md" if args.quick else REPO / "docs" / "SPLIT.md"
    out.write_text(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
