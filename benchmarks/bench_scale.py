"""Size as a measured dimension (issue 14): every command on SmolLM2-135M and on a 1.07 B-parameter
Llama built from a config (4.3 GB in fp32, so its graph lives in external data), in fp32, int8 and int4.

    python benchmarks/bench_scale.py --work DIR [--models smollm2,llama-1b] [--resume]

Each step is one ``edgeft`` process; its wall time and peak RSS (the child's own ``ru_maxrss``, read with
``os.wait4``; this driver imports neither torch nor onnxruntime, so the child starts small) are kept per
step in ``docs/scale-runs/MODEL.json`` as they finish (``--resume`` skips finished steps). Then
``docs/SCALE.md`` and ``docs/scale-memory.png`` are written from whatever is there.

Per bundle (fp32 and its int8 and int4 copies): ``info``, ``plan`` (batch 4), ``eval`` (batch 4) and
``train`` (3 MeZO steps of batch 4 on ~2,000 tokens of three tragedies: the zeroth-order step's time and memory); on the fp32
bundle also ``compress`` (LoRD at energy 0.9), ``deploy`` (merged; adapter file; merged int8) and
``split``. Perplexity is on Macbeth (SmolLM2 only means anything: the 1 B model's weights are random).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_facts  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNS = DOCS / "scale-runs"
MODELS = ("smollm2", "llama-1b")
FORMATS = ("fp32", "int8", "int4")
TRAIN_PLAYS = ("tragedies/hamlet", "tragedies/othello", "tragedies/king-lear")
TEST_TOKENS = {"smollm2": 8192, "llama-1b": 1024}  # the 1 B model's perplexity is noise: time and memory only
PROFILE = 'name = "bench-two-threads"\nthreads = 2\nbatch_size = 4\nmax_length = 128\n'


def measured(cmd: list, log: Path) -> dict:
    """Run ``cmd``; its wall time, the child's peak RSS and, for ``--json`` commands, the object it printed."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    result = {"command": " ".join(str(c) for c in cmd), "wall_s": round(time.perf_counter() - start, 1),
              "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "rc": os.waitstatus_to_exitcode(status)}
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    if lines:
        result["json"] = json.loads(lines[-1])
    if result["rc"] != 0:
        result["error"] = Path(log).read_text().strip().splitlines()[-1:] or ["(no output)"]
    return result


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6, 1)


def graph_mb(path: Path) -> float:
    """The bundle's graph and its external data: the weights a session maps."""
    return round(sum(p.stat().st_size for p in Path(path).glob("model.onnx*")) / 1e6, 1)


def prepare_data(work: Path, model: str, bundle: Path) -> dict:
    from tokenizers import Tokenizer

    from edgeft import assets

    plays = assets.shakespeare()
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    test, count = [], 0
    for line in plays["tragedies/macbeth"].splitlines(keepends=True):
        test.append(line)
        count += len(tok.encode(line).ids)
        if count >= TEST_TOKENS[model]:
            break
    files = {"train": work / "train.jsonl", "test": work / f"test-{model}.jsonl", "profile": work / "two-threads.toml"}
    files["train"].write_text("".join(json.dumps({"text": plays[p][:3000]}) + "\n" for p in TRAIN_PLAYS))
    files["test"].write_text(json.dumps({"text": "".join(test)}) + "\n")
    files["profile"].write_text(PROFILE)
    return files


def steps_for(model: str, work: Path, files: dict) -> list[tuple[str, list, Path | None]]:
    """(name, command, folder it writes) in order; later steps read earlier steps' folders."""
    edgeft = [sys.executable, "-m", "edgeft.cli"]
    fp32 = work / model
    steps: list[tuple[str, list, Path | None]] = []
    if model == "llama-1b":
        source = work / "llama-1b-src"
        steps.append(("build", [sys.executable, Path(__file__).parent / "scale_model.py", source], source))
        steps.append(("export", [*edgeft, "export", source, "-o", fp32, "--task", "causal-lm"], fp32))
    else:
        from edgeft import assets

        gguf = assets.smollm2_gguf()
        steps.append(("export", [*edgeft, "export", gguf.parent, "--gguf-file", gguf.name, "--task", "causal-lm",
                                 "-o", fp32], fp32))
    bundles = {"fp32": fp32, "int8": work / f"{model}-int8", "int4": work / f"{model}-int4"}
    for fmt in ("int8", "int4"):
        steps.append((f"compress {fmt}", [*edgeft, "compress", fp32, "-o", bundles[fmt], "--quantize", fmt], bundles[fmt]))
    device = ["--device", files["profile"]]
    for fmt, bundle in bundles.items():
        steps.append((f"info {fmt}", [*edgeft, "info", bundle], None))
        steps.append((f"plan {fmt}", [*edgeft, "plan", bundle, *device, "--batch-size", 4, "--json"], None))
        steps.append((f"eval {fmt}", [*edgeft, "eval", bundle, "--data", files["test"], "--batch-size", 4, *device,
                                      "--json"], None))
        run = work / f"{model}-{fmt}-run"
        steps.append((f"train {fmt}", [*edgeft, "train", bundle, "--data", files["train"], "--optimizer", "mezo",
                                       "--output-fit-steps", 0, "--steps", 3, "--eval-every", 100, "--batch-size", 4,
                                       *device, "-o", run, "--overwrite", "--json"], run))
        fit = work / f"{model}-{fmt}-fit"  # the default recipe: the top blocks' exact fit, 3 steps, held-out scored
        steps.append((f"fit {fmt}", [*edgeft, "train", bundle, "--data", files["train"], "--eval-data", files["train"],
                                     "--budget", "3fwd", "--batch-size", 4, *device, "-o", fit, "--overwrite", "--json"], fit))
    adapter = work / f"{model}-fp32-run" / "adapter"
    for name, extra in (("deploy merge", ["--merge"]), ("deploy adapter", []), ("deploy merge int8", ["--merge", "--quantize", "int8"])):
        out = work / f"{model}-{name.replace(' ', '-')}"
        steps.append((name, [*edgeft, "deploy", fp32, "--adapter", adapter, "-o", out, *extra], out))
    lord = work / f"{model}-lord"
    steps.append(("compress lord", [*edgeft, "compress", fp32, "-o", lord, "--energy", 0.9], lord))
    steps.append(("eval lord", [*edgeft, "eval", lord, "--data", files["test"], "--batch-size", 4, *device, "--json"], None))
    split = work / f"{model}-split"
    steps.append(("split", ["cp", "-r", fp32, split], split))  # split changes its bundle: a copy
    steps.append(("split cut", [*edgeft, "split", split, "--at", 1], None))
    steps.append(("eval split", [*edgeft, "eval", split, "--data", files["test"], "--batch-size", 4, *device, "--json"], None))
    return steps


def run_model(model: str, work: Path, resume: bool) -> dict:
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / f"{model}.json"
    record = json.loads(path.read_text()) if resume and path.is_file() else {"model": model, "steps": {}}
    record["machine"] = machine_facts(("onnxruntime", "onnx", "numpy"))
    files = None
    for name, cmd, writes in steps_for(model, work, {"profile": work / "two-threads.toml", "train": work / "train.jsonl",
                                                    "test": work / f"test-{model}.jsonl"}):
        done = record["steps"].get(name)
        if done and done.get("rc") == 0:
            continue
        if files is None and name not in ("build", "export"):
            files = prepare_data(work, model, work / model)
        if writes is not None and writes.exists() and name not in ("split cut",):
            shutil.rmtree(writes)
        print(f"[{model}] {name} ...", flush=True)
        result = measured(cmd, work / f"{model}-{name.replace(' ', '-')}.log")
        if writes is not None and writes.exists():
            result["folder_mb"], result["graph_mb"] = folder_mb(writes), graph_mb(writes)
        record["steps"][name] = result
        path.write_text(json.dumps(record, indent=1))
        print(f"  rc {result['rc']}  {result['wall_s']} s  peak {result['peak_rss_mb']} MB"
              + (f"  {result['error']}" if result["rc"] else ""), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for model in args.models.split(","):
            run_model(model, args.work, args.resume)
    from scale_report import render

    render(DOCS)


if __name__ == "__main__":
    main()
