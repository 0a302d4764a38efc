"""docs/SCALE.md and docs/scale-memory.png from the per-step results in docs/scale-runs/*.json."""

from __future__ import annotations

import json
from pathlib import Path

# parameters of the two models (SmolLM2-135M-Instruct's config; the config model's count from scale_model.py)
PARAMS = {"smollm2": 134_515_008, "llama-1b": 1_069_639_680}
NAMES = {"smollm2": "SmolLM2-135M (real)", "llama-1b": "Llama 1.07 B (config, random weights)"}
FORMATS = ("fp32", "int8", "int4")


def _load(docs: Path) -> dict[str, dict]:
    runs = {}
    for model in PARAMS:
        path = docs / "scale-runs" / f"{model}.json"
        if path.is_file():
            runs[model] = json.loads(path.read_text())
    return runs


def _cell(value, fmt="{:.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def _step(record: dict, name: str) -> dict:
    step = record["steps"].get(name) or {}
    return step if step.get("rc") == 0 else {}


def _rows(model: str, record: dict) -> list[dict]:
    fp32_graph = _step(record, "export").get("graph_mb")
    rows = []
    for fmt in FORMATS:
        made = _step(record, "export" if fmt == "fp32" else f"compress {fmt}")
        plan = _step(record, f"plan {fmt}").get("json", {})
        ev = _step(record, f"eval {fmt}").get("json", {})
        tr = _step(record, f"train {fmt}").get("json", {})
        fit = _step(record, f"fit {fmt}").get("json", {})
        steps = tr.get("steps") or 0
        rows.append({
            "model": model, "format": fmt, "graph_mb": made.get("graph_mb"),
            "size_ratio": made.get("graph_mb") / fp32_graph if made.get("graph_mb") and fp32_graph else None,
            "made_s": made.get("wall_s"), "made_peak_mb": made.get("peak_rss_mb"),
            "eval_peak_mb": ev.get("peak_rss_mb"), "plan_eval_mb": plan.get("predicted_eval_peak_rss_mb"),
            "train_peak_mb": tr.get("peak_rss_mb"), "plan_train_mb": plan.get("predicted_train_peak_rss_mb"),
            "fit_peak_mb": fit.get("peak_rss_mb"),
            "step_s": tr["wall_s"] / steps if steps else None, "perplexity": ev.get("perplexity"),
        })
    return rows


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "–"


def render(docs: Path) -> None:
    runs = _load(docs)
    if not runs:
        return
    lines = ["# Size: 135 M and 1 B parameters, fp32, int8, int4 (issue 14)", "",
             "`python benchmarks/bench_scale.py --work DIR --models llama-1b,smollm2 --resume`; raw per-step results in "
             "`docs/scale-runs/` (one JSON per model, kept as each step finishes). Every step is one `edgeft` process; "
             "peak RSS is that process's own (`ru_maxrss` from `wait4`); two ORT threads; eval and train at batch 4, "
             "128-token windows. Perplexity on Macbeth's first 8,192 tokens (SmolLM2 only: the 1 B model is random, its "
             "1,024-token eval measures time and memory). Train = 3 MeZO steps (2 forward passes each; since session 22 without the output fit first, "
             "which the fit column measures); step time is the trainer's own loop time over its steps. Fit = the default recipe (`--budget 3fwd --eval-data`: 3 steps of the "
             "top blocks' exact fit and its held-out scoring of the training windows; since session 22 an int8/int4 bundle's "
             "fit runs on its own graph below the blocks, so it never opens the whole graph either). The plan columns are "
             "`edgeft plan --batch-size 4` (issue 14 §3; its train is the default recipe's: compare it with the fit).", "",
             "| model | format | graph MB | x fp32 | made in s | made, peak MB | eval peak MB | plan: eval | train peak MB | "
             "plan: train | fit peak MB | fit / eval | ZO step s | perplexity |", "|" + "---|" * 14]
    rows = [r for model, record in runs.items() for r in _rows(model, record)]
    for r in rows:
        lines.append(
            f"| {NAMES[r['model']]} | {r['format']} | {_cell(r['graph_mb'])} | {_cell(r['size_ratio'], '{:.2f}')} | "
            f"{_cell(r['made_s'])} | {_cell(r['made_peak_mb'])} | {_cell(r['eval_peak_mb'])} | {_cell(r['plan_eval_mb'])} | "
            f"{_cell(r['train_peak_mb'])} | {_cell(r['plan_train_mb'])} | {_cell(r['fit_peak_mb'])} | "
            f"{_ratio(r['fit_peak_mb'], r['eval_peak_mb'])} | "
            f"{_cell(r['step_s'], '{:.1f}')} | {_cell(r['perplexity'], '{:.2f}') if r['model'] == 'smollm2' else '–'} |")
    lines += ["", "Every other command on each fp32 bundle (peak / graph: the process's peak RSS over the size of the "
              "graph it reads):", "", "| model | command | wall s | peak RSS MB | peak / graph | output MB |", "|---|---|---|---|---|---|"]
    for model, record in runs.items():
        graph = _step(record, "export").get("graph_mb")
        for name in ("info fp32", "deploy merge", "deploy adapter", "deploy merge int8", "compress lord", "eval lord",
                     "split cut", "eval split"):
            step = record["steps"].get(name)
            if not step:
                continue
            if step.get("rc") != 0:
                lines.append(f"| {NAMES[model]} | `{name}` | {step['wall_s']:.0f} | {step['peak_rss_mb']:.0f} | – | "
                             f"failed (rc {step['rc']}) |")
                continue
            lines.append(f"| {NAMES[model]} | `{name}` | {step['wall_s']:.0f} | {step['peak_rss_mb']:.0f} | "
                         f"{_ratio(step['peak_rss_mb'], graph)} | {_cell(step.get('graph_mb'))} |")
    notes = docs / "scale-notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    lines += ["", "Plot: `docs/scale-memory.png` (peak RSS against parameters)."]
    (docs / "SCALE.md").write_text("\n".join(lines) + "\n")
    _plot(rows, docs / "scale-memory.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for fmt, marker in zip(FORMATS, "osd", strict=True):
        for key, style in (("train_peak_mb", "-"), ("eval_peak_mb", ":")):
            pts = sorted((PARAMS[r["model"]] / 1e6, r[key]) for r in rows if r["format"] == fmt and r[key])
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, label=f"{fmt} {key.split('_')[0]}")
    pts = sorted((PARAMS[r["model"]] / 1e6, r["graph_mb"]) for r in rows if r["format"] == "fp32" and r["graph_mb"])
    if pts:
        ax.plot(*zip(*pts), "k--", label="fp32 weights (graph MB)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("edgeft train / eval peak memory, batch 4 x 128 tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
