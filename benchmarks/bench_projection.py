"""Projection scaling for the population optimizers (issue 3): the shape/update rule alone, against it
times each layer's hidden-state std over the median (``projection=hidden``, after 2403.01754).

    python benchmarks/bench_projection.py                # both run sets, then docs/PROJECTION.md + docs/projection-rt.png
    python benchmarks/bench_projection.py --render-only  # the table from the saved runs

Each variant is one ``bench_optimizers.py`` run set (its own tag, so its runs, settings and report stay
its own): Rotten Tomatoes, cma and dfo-layerwise (+ MeZO, which bench_optimizers always runs), the same
seeds, budget and test set. Only ``projection`` differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import bench_optimizers as bo  # benchmarks/ is on sys.path when run as a script

VARIANTS = {"shape": [], "hidden": ["--set", "cma:projection=hidden", "--set", "dfo-layerwise:projection=hidden"]}
OPTIMIZERS = ["cma", "dfo-layerwise"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=160)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--out", type=Path, default=bo.REPO / "docs" / "PROJECTION.md")
    return p.parse_args(argv)


def tag(variant: str) -> str:
    return f"proj-{variant}"


def run(args, variant: str) -> None:
    cmd = [sys.executable, str(Path(bo.__file__).resolve()), "--tasks", "rt", "--optimizers", ",".join(OPTIMIZERS),
           "--seeds", args.seeds, "--budget", str(args.budget), "--eval-every", str(args.budget),
           "--test-size", str(args.test_size), "--no-backprop", "--workers", str(args.workers), "--threads", "1",
           "--tag", tag(variant), "--out", str(bo.CACHE / tag(variant) / "OPTIMIZERS.md"), "--resume", *VARIANTS[variant]]
    subprocess.run(cmd, check=True)


def render(out: Path) -> None:
    results = {v: json.loads((bo.CACHE / tag(v) / "results.json").read_text())["rt"] for v in VARIANTS}
    lines = ["| optimizer | projection | final accuracy (mean ± std) | start | change per seed (points) | CPU s / fwd |",
             "|---|---|---|---|---|---|"]
    series = {}
    for name in ["mezo", *OPTIMIZERS]:
        for variant in VARIANTS if name != "mezo" else ["shape"]:
            runs = sorted(results[variant].get(name, []), key=lambda r: r["seed"])
            if not runs:
                continue
            finals = [r["curve"][-1]["value"] for r in runs]
            starts = [r["curve"][0]["value"] for r in runs]
            changes = ", ".join(f"{100 * (f - s):+.1f}" for f, s in zip(finals, starts))
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            cpu = statistics.median(r["cpu_s_per_forward"] for r in runs)
            label = "–" if name == "mezo" else variant
            lines.append(f"| `{name}` | {label} | {statistics.mean(finals):.3f} ± {spread:.3f} | "
                         f"{statistics.mean(starts):.3f} | {changes} | {cpu:.2f} |")
            series[f"{name} ({label})"] = [f - s for f, s in zip(finals, starts)]
    paired = []  # same seed, same start and k-shot draw: the difference the projection makes
    for name in OPTIMIZERS:
        a, b = series.get(f"{name} (shape)"), series.get(f"{name} (hidden)")
        if a and b and len(a) == len(b):
            diffs = [100 * (y - x) for x, y in zip(a, b)]
            paired.append(f"- `{name}`: hidden − shape per seed {', '.join(f'{d:+.1f}' for d in diffs)} points "
                          f"(mean {statistics.mean(diffs):+.1f}).")
    stds = next((r["config"].get("layer_std") for r in results["hidden"].get("cma", []) if r["config"].get("layer_std")), None)
    if stds:  # the factors the hidden variant applied (seed 0's k-shot set)
        factors = [x / statistics.median(stds) for x in stds]
        paired.append(f"- Layer factors std_ℓ / median ({len(stds)} layers): {', '.join(f'{f:.2f}' for f in factors)}.")
    first = next(iter(results["shape"].values()))[0]
    budget, seeds = first["forward_passes"], sorted({r["seed"] for r in next(iter(results["shape"].values()))})
    text = f"""# Projection scaling: shape/update rule vs. per-layer hidden-state std

Made by `benchmarks/bench_projection.py`: MiniLM-L6 on Rotten Tomatoes (k = 16 per class, linear-probe start,
LoRA r=8), seeds {', '.join(map(str, seeds))}, {budget} training forward passes per run, 300 fixed test examples.
Both variants use each tensor's update spread (`spread=update`); `hidden` also multiplies each layer's
block by std(hidden states entering the layer) / median over layers, measured once on the k-shot set
with the base model. Runs are raw (no keep-best). One accuracy on 300 examples has a standard error of
≈ 2.8 points. Full reports: `benchmarks/.cache/optimizers/proj-*/OPTIMIZERS.md`.

{chr(10).join(lines)}

Paired by seed:
{chr(10).join(paired)}

![accuracy change per seed](projection-rt.png)
"""
    out.write_text(text)
    plot(series, out.with_name("projection-rt.png"))
    print(text)
    print(f"written to {out}")


def plot(series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for i, (label, changes) in enumerate(series.items()):
        ax.scatter([100 * c for c in changes], [i] * len(changes), s=30)
        ax.plot([100 * statistics.mean(changes)] * 2, [i - 0.3, i + 0.3], color="black")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(series)), list(series))
    ax.set_xlabel("test accuracy change from the start (points; bar: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.render_only:
        for variant in VARIANTS:
            run(args, variant)
    render(args.out)


if __name__ == "__main__":
    main()
