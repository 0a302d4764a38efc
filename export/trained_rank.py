"""``edgeft compress --trained-rank``: ranks chosen while the bundle trains (TRP, arXiv 1812.02402), forward-only.

Trained Rank Pruning alternates training with low-rank truncation of every layer and adds a
nuclear-norm regulariser; the regulariser's proximal step, soft-thresholding of the singular
values, needs no gradient. Here the training between truncations is edgeft's own forward-only
training of the bundle's LoRA adapters (``edgeft train``), and each *fold* does, per linear layer:

    W ← W + scale·Aᵀ·Bᵀ                        (the trained LoRA, where the layer has one)
    σᵢ ← max(σᵢ − shrink·mean(σ), 0)          (the nuclear-norm proximal step)
    keep the smallest rank holding energy^(1/folds) of Σσᵢ²

then the LoRA restarts at B = 0 on the new factors. ``folds`` truncations of energy^(1/folds)
each keep about ``energy`` of each layer's original Σσ², as one post-hoc LoRD at ``energy`` does,
but the model trains between the cuts and each cut sees the weights as trained so far. The last
segment's training stays an ordinary run in ``OUT/training`` (its adapter on the final factors),
so the result is compared with post-hoc LoRD + the same training budget on equal terms.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.manifest import MODEL_NAME, Manifest

TRAINING_DIR = "training"  # inside the output bundle: the last segment's run (adapter, metrics, curve)


@dataclass
class TrainedRankRequest:
    bundle: Path
    out: Path
    data: Path
    energy: float = 0.9
    folds: int = 4
    shrink: float = 0.01  # per cut, as a fraction of the layer's mean singular value
    calibrate: Path | None = None  # activation-aware SVD on this data's activations (lord.collect_covariances)
    steps: int | None = None  # over the whole run, split evenly between the segments
    budget: str | None = None  # "400fwd" or "20m" over the whole run, split evenly
    optimizer: str = "auto"
    eval_data: Path | None = None
    k_shot: int | None = None
    batch_size: int | None = None
    seed: int = 0
    device: str | None = None
    progress: bool = True


def trained_rank(req: TrainedRankRequest, log: Callable[[str], None] = print) -> dict:
    from edgeft.data import load_dataset
    from edgeft.runtime import Bundle

    from . import lord
    from .bundle import write_bundle
    from .merge import lora_branches
    from .onnx_files import load_model

    bundle_dir, out = Path(req.bundle), Path(req.out)
    manifest = Manifest.load(bundle_dir)
    if out.exists() and any(out.iterdir()):
        raise EdgeftError(f"{out}: already exists and is not empty (choose another -o)")
    if not 0 < req.energy <= 1:
        raise EdgeftError("--energy must be in (0, 1]")
    if req.folds < 1:
        raise EdgeftError("--folds must be at least 1")
    if not 0 <= req.shrink < 1:
        raise EdgeftError("--shrink must be in [0, 1)")
    if manifest.adapter.kind != "lora" or manifest.adapter.init != "zeros":
        raise EdgeftError(f"--trained-rank folds LoRA adapters that start at B = 0; this bundle's adapter is "
                          f"{manifest.adapter.kind} ({manifest.adapter.init})")
    if not Path(req.data).is_file():
        raise EdgeftError(f"--data {req.data}: no such file")
    model = load_model(bundle_dir / MODEL_NAME)
    if any(i.name.endswith((".lord_in", ".lord_out")) for i in model.graph.initializer):
        raise EdgeftError(f"{bundle_dir}: already LoRD-compressed; --trained-rank starts from the uncompressed bundle")
    source = Bundle(bundle_dir)
    load_dataset(req.data, source.labels)  # bad data fails here, before any work
    steps, budgets = _segments(req)

    covariances = None
    if req.calibrate is not None:
        data = load_dataset(req.calibrate, source.labels if source.task != "causal-lm" else None)
        covariances = lord.collect_covariances(source, model, source.encode(data.texts, data.labels))
        log(f"calibrated on {len(data)} texts")
    layers = {init.name: (node, _array(init)) for node, init in lord.linear_weights(model)}
    branches = lora_branches(model, manifest)
    inits = {i.name: i for i in model.graph.initializer}
    # each layer's current weight (float64): the LoRD candidates, and every adapted weight (also one
    # LoRD leaves alone, e.g. a Gemm), since each segment's LoRA is folded in before the next restarts
    weights = {name: w for name, (_, w) in layers.items()} | {b.weight: _array(inits[b.weight]) for b in branches}
    # the layers that are cut: those post-hoc LoRD at --energy would compress (the others only fold
    # their LoRA, exactly); each cut keeps energy^(1/folds) of what is left
    cut = {p.weight for p in lord.plan(model, energy=req.energy, covariances=covariances)[0] if p.compressed}
    if not cut:
        raise EdgeftError(f"--energy {req.energy}: no linear layer would be smaller at that energy (try a lower one)")
    per_fold = req.energy ** (1.0 / req.folds)
    history = []
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".edgeft-trp-", dir=out.parent))
    try:
        for fold in range(req.folds):
            last = fold == req.folds - 1
            plans, factors = _truncate(layers, weights, cut, covariances, per_fold, req.shrink, last=last)
            compressed = lord.apply(_with_weights(model, plans, weights), plans, factors)
            kept = sum(p.params for p in plans) / sum(p.shape[0] * p.shape[1] for p in plans)
            history.append({"fold": fold + 1, "kept": kept, "ranks": {p.weight: p.rank for p in plans}})
            log(f"cut {fold + 1}/{req.folds}: linear parameters {kept:.1%} kept (energy {per_fold:.4f} of each layer)")
            if last:  # the final bundle, written whole or not at all; its training is a normal run inside it
                folder = out
                write_bundle(out, lambda tmp: _write(compressed, bundle_dir, manifest, tmp))
            else:
                folder = work / f"bundle-{fold}"
                folder.mkdir()
                _write(compressed, bundle_dir, manifest, folder)
            run_dir = out / TRAINING_DIR if last else work / f"run-{fold}"
            summary = _train(req, folder, run_dir, steps[fold], budgets[fold], output_fit=last)
            history[-1]["training"] = {k: summary.get(k) for k in ("steps", "forward_passes", "best_step", "best")}
            if not last:
                _fold_adapters(source.layout, req.seed, run_dir / "adapter", branches, weights)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before = sum(p.shape[0] * p.shape[1] for p in plans)
    after = sum(p.params for p in plans)
    return {"layers": [vars(p) | {"compressed": p.compressed} for p in plans], "linear_params_before": before,
            "linear_params_after": after, "kept": after / before if before else 1.0, "folds": history,
            "adapter": str(out / TRAINING_DIR / "adapter"), "training": summary}


def _array(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init).astype(np.float64)


def _segments(req: TrainedRankRequest) -> tuple[list, list]:
    """Each training segment's --steps and --budget: the run's totals split evenly (the last takes the rest)."""
    from edgeft.runtime.budget import parse_budget
    from edgeft.training import DEFAULT_STEPS

    if req.steps is not None and req.steps < req.folds:
        raise EdgeftError(f"--steps {req.steps}: fewer than one step per cut ({req.folds} folds)")
    budget = parse_budget(req.budget) if req.budget is not None else None
    steps = _split(req.steps, req.folds) if req.steps else [None] * req.folds
    if budget is None:
        return (steps if req.steps else _split(DEFAULT_STEPS, req.folds)), [None] * req.folds
    if budget.forward_passes is None:
        return steps, [f"{budget.seconds / req.folds:g}s"] * req.folds
    if budget.forward_passes < req.folds:
        raise EdgeftError(f"--budget {req.budget}: fewer than one forward pass per cut ({req.folds} folds)")
    return steps, [f"{p}fwd" for p in _split(budget.forward_passes, req.folds)]


def _split(total: int, parts: int) -> list[int]:
    share = total // parts
    return [share] * (parts - 1) + [total - share * (parts - 1)]


def _truncate(layers, weights, cut, covariances, energy: float, shrink: float, last: bool):
    """Soft-threshold and truncate the weights of the ``cut`` layers; the LoRD plans and factors."""
    from .lord import LayerPlan, _factor

    plans, factors = [], {}
    for name, (node, _) in layers.items():
        w = weights[name]
        if name not in cut:
            plans.append(LayerPlan(node.name, name, w.shape, min(w.shape), 1.0))
            continue
        cov = covariances.get(node.input[0]) if covariances else None
        left, s, right = _factor(w, cov)
        # the threshold scales with the mean singular value, not the largest: a causal LM's whitened spectrum
        # has outlier directions (massive activations) whose σ₁ is far above the rest; 1% of it zeroed most of
        # SmolLM2's spectrum at the first cut (measured: 28.5% of the parameters left, perplexity 2e6)
        s = np.maximum(s - shrink * s.mean(), 0.0)
        sq = s**2
        cumulative = np.cumsum(sq) / sq.sum()
        rank = min(int(np.searchsorted(cumulative, energy - 1e-12) + 1), int((s > 0).sum()))
        weights[name] = (left[:, :rank] * s[:rank]) @ right[:rank]  # trains and folds on from here
        plan = LayerPlan(node.name, name, w.shape, rank, float(cumulative[rank - 1]))
        if plan.compressed:
            factors[node.name] = (left, s, right)
        elif last:  # factors no smaller than the matrix: it stays whole (as cut so far)
            plan = LayerPlan(node.name, name, w.shape, min(w.shape), plan.energy)
        plans.append(plan)
    return plans, factors


def _with_weights(model, plans, weights):
    """A copy of ``model`` whose uncompressed linear layers hold their current (folded) weights."""
    from onnx import numpy_helper

    from .onnx_files import clone

    model = clone(model)
    whole = set(weights) - {p.weight for p in plans if p.compressed}
    for init in model.graph.initializer:
        if init.name in whole:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
    return model


def _write(model, source: Path, manifest: Manifest, folder: Path) -> dict:
    from .compress import _derived_manifest
    from .onnx_files import save_model

    save_model(model, folder / MODEL_NAME)
    _derived_manifest(source, replace(manifest), folder, keep_exact_fit=False)
    return {}


def _train(req: TrainedRankRequest, folder: Path, run_dir: Path, steps, budget, output_fit: bool) -> dict:
    """One segment: ``edgeft train`` on the bundle as cut so far, at the same seed (the same k-shot draw
    and LoRA start). A causal LM's output adapter is not a layer weight to fold: only the last segment
    fits it (as ``edgeft train`` would), the others spend their passes on the body."""
    from edgeft.training import TrainRequest, run_training

    return run_training(TrainRequest(
        bundle=folder, data=req.data, run_dir=run_dir, eval_data=req.eval_data, optimizer=req.optimizer, steps=steps,
        budget=budget, batch_size=req.batch_size, k_shot=req.k_shot, seed=req.seed, device=req.device,
        output_fit_steps=None if output_fit else 0, progress=req.progress, overwrite=True), log=lambda m: None)


def _fold_adapters(layout, seed: int, adapter: Path, branches, weights) -> None:
    """Add each trained LoRA to its layer's current weight (the next cut then sees it)."""
    from edgeft.adapters import load_adapter

    values = layout.unflatten(load_adapter(adapter, layout, base=layout.initial(seed)))
    for branch in branches:
        delta = branch.delta(values[branch.a], values[branch.b])
        if not np.all(np.isfinite(delta)):
            raise EdgeftError(f"{adapter}: the trained adapter of {branch.module} is not finite")
        weights[branch.weight] = weights[branch.weight] + delta
