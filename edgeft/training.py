"""``edgeft train`` as a function: data → run folder with adapter, checkpoint, metrics and plot."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeft.adapters import save_adapter
from edgeft.distribution import save_distribution
from edgeft.data import k_shot as sample_k_shot
from edgeft.data import load_dataset
from edgeft.errors import EdgeftError

RUN_FILES = ("adapter", "checkpoint", "metrics.jsonl", "curve.png", "summary.json", "run.json")
# Settings that must not change on --resume, or the continued run would differ from an uninterrupted one.
DEFAULT_STEPS = 500  # without --steps or a budget; also the schedule horizon of a time budget
RESUME_KEYS = ("optimizer", "settings", "batch_size", "k_shot", "seed", "data", "eval_every", "eval_limit",
               "output_fit_steps")


@dataclass
class TrainRequest:
    bundle: Path
    data: Path
    run_dir: Path
    eval_data: Path | None = None
    optimizer: str = "auto"  # a registered name, or "auto" (runtime/recipes.py)
    steps: int | None = None  # None: DEFAULT_STEPS, or until --budget is spent when one is set
    budget: str | None = None  # "20m", "4000fwd" (runtime/budget.py); default: the device profile's
    batch_size: int | None = None
    fit_memory: bool = False  # --batch-size auto: the largest batch the profile's memory budget allows (edgeft plan)
    settings: dict = field(default_factory=dict)  # optimizer settings: lr, eps, queries, ...
    k_shot: int | None = None
    eval_every: int = 50
    eval_limit: int | None = None
    seed: int = 0
    device: str | None = None
    init_adapter: Path | None = None
    output_fit_steps: int | None = None  # causal LM: output fit steps (None: the recipe's, recipes.py); 0: no output fit
    text_field: str = "text"
    label_field: str = "label"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


def _prepare_run_dir(req: TrainRequest) -> None:
    run_dir = Path(req.run_dir)
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if req.resume:
        if not (run_dir / "run.json").is_file():
            raise EdgeftError(f"{run_dir}: no run to resume (no run.json)")
        return
    if existing and not req.overwrite:
        raise EdgeftError(f"{run_dir}: already holds a run ({', '.join(existing)}); pass --resume or --overwrite")
    for name in existing:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _run_record(req: TrainRequest, batch_size: int) -> dict:
    return {
        "bundle": str(req.bundle), "data": str(req.data), "eval_data": str(req.eval_data) if req.eval_data else None,
        "optimizer": req.optimizer, "settings": {k: v for k, v in req.settings.items() if v is not None},
        "batch_size": batch_size, "k_shot": req.k_shot, "seed": req.seed, "eval_every": req.eval_every,
        "eval_limit": req.eval_limit, "steps": req.steps, "budget": req.budget, "device": req.device,
        "init_adapter": str(req.init_adapter) if req.init_adapter else None, "output_fit_steps": req.output_fit_steps,
    }


def run_training(req: TrainRequest, log: Callable[[str], None] = print) -> dict:
    from threadpoolctl import threadpool_limits

    from edgeft.runtime import load_profile

    # the profile's thread count holds for numpy's BLAS too (the exact fits' matmuls), not only for ORT:
    # a one-core profile is one core
    with threadpool_limits(limits=load_profile(req.device).intra_op_threads, user_api="blas"):
        return _run_training(req, log)


def _run_training(req: TrainRequest, log: Callable[[str], None]) -> dict:
    from edgeft.adapters import OUTPUT_ADAPTER_WEIGHTS, searched_tensors
    from edgeft.plots import learning_curve_in_child
    from edgeft.runtime import Bundle, TrainConfig, Trainer, layer_input_std, load_profile, make_optimizer, starting_adapter
    from edgeft.runtime.optimizers import POPULATION, REGISTRY, needs_input_bases
    from edgeft.runtime.output_fit import (OutputFitConfig, describe_fit, fit_kind, fit_output_adapter,
                                           label_probe_tensors, output_bias_slice)
    from edgeft.runtime.recipes import auto_recipe
    from edgeft.runtime.budget import parse_budget
    from edgeft.runtime.memory import budget_warning

    profile = load_profile(req.device)
    budget_text = req.budget or (profile.budget if req.steps is None else None)
    budget = parse_budget(budget_text) if budget_text else None
    batch_size = req.batch_size or profile.batch_size
    if batch_size < 1 or (req.steps is not None and req.steps < 1):
        raise EdgeftError("--batch-size and --steps must be at least 1")
    steps = req.steps if req.steps is not None or budget else DEFAULT_STEPS
    if req.optimizer != "auto" and req.optimizer not in REGISTRY:
        raise EdgeftError(f"unknown optimizer {req.optimizer!r} (known: auto, {', '.join(sorted(REGISTRY))})")
    if req.output_fit_steps is not None and req.output_fit_steps < 0:
        raise EdgeftError("--output-fit-steps must be 0 (no fit) or more")
    if budget and budget.seconds and steps is None and req.settings.get("schedule") == "linear":
        raise EdgeftError("--schedule linear decays over --steps: give --steps or a forward-pass budget with a time budget")
    bundle = Bundle(req.bundle, profile, open_graph=False)
    fit_alone = _fit_alone(bundle, req, budget)
    if fit_alone:
        bundle.below_session  # opened and checked now: bad files must not cost a saved run
    else:
        bundle.session
    if bundle.manifest.encoder_blocks is not None and bundle.task == "classification":
        from edgeft.runtime.encoder_blocks import EncoderBlocksFit

        EncoderBlocksFit.check(bundle.folder, bundle.manifest)  # its weights file checked now, for the same reason
    # Read and check all input before touching the run folder: bad data must not cost a saved run.
    train_set = load_dataset(req.data, bundle.labels, req.text_field, req.label_field)
    if req.k_shot:
        train_set = sample_k_shot(train_set, req.k_shot, req.seed)
    if req.batch_size is None and bundle.task != "causal-lm" and len(train_set) <= profile.whole_set_max:
        # the whole few-shot set in every evaluation: no batch-sampling noise left, only the direction's
        # (and a split bundle then runs its frozen lower layers once per run)
        batch_size = len(train_set)
    if profile.memory_budget_mb is not None or req.fit_memory:
        batch_size = _planned_batch(req, profile, fit_alone, batch_size, log)
    eval_set = None
    if req.eval_data:
        eval_set = load_dataset(req.eval_data, bundle.labels, req.text_field, req.label_field)
        if req.eval_limit and len(eval_set) > req.eval_limit:
            eval_set = eval_set.subset(np.random.default_rng(req.seed).permutation(len(eval_set))[: req.eval_limit])
    record = _run_record(req, batch_size)
    if req.resume:
        previous = json.loads((Path(req.run_dir) / "run.json").read_text()) if (Path(req.run_dir) / "run.json").is_file() else {}
        changed = [k for k in RESUME_KEYS if previous.get(k) != record.get(k)]
        if changed:
            raise EdgeftError(f"--resume with different settings ({', '.join(changed)}): the run would not continue as it began")
    _prepare_run_dir(req)
    run_dir = Path(req.run_dir)
    (run_dir / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    train_enc = bundle.encode(train_set.texts, train_set.labels)
    eval_enc = bundle.encode(eval_set.texts, eval_set.labels) if eval_set else None
    held_back = 0
    if eval_enc is None and bundle.task == "causal-lm" and len(train_enc) >= 2 * STOP_WINDOWS:
        # A causal LM's training text is long: ranking adapters on all of it costs a pass over the whole text
        # per evaluation (SmolLM2, three plays: 118 s each; a 10-pass run took 380 s, now 68), and it cannot see
        # over-fitting. Held-back windows are cheap and unseen: the fit stops on them, the trainer ranks on them.
        train_enc, eval_enc = _held_back_split(train_enc)
        held_back = len(eval_enc)
        log(f"no --eval-data: {held_back} of the {len(train_enc.ids) + held_back} training windows held back to rank the adapters")
    has_bias = output_bias_slice(bundle) is not None
    has_label_probe = label_probe_tensors(bundle)
    encoder = bundle.manifest.encoder_blocks is not None and bundle.task == "classification"
    exact = fit_kind(bundle.manifest) if bundle.manifest.exact_fit_tensors() or encoder else None
    recipe = auto_recipe(bundle.task, has_bias, has_label_probe, exact) if req.optimizer == "auto" else None
    name = recipe.optimizer if recipe else req.optimizer
    if recipe:
        log(f"optimizer auto: {recipe.why}")
    output_fit, fit_cost = None, (0, 0.0)
    if req.resume:
        theta, how = bundle.layout.initial(req.seed), "checkpoint"
    else:
        fit_steps = OutputFitConfig.steps if req.output_fit_steps is None else req.output_fit_steps
        if budget and recipe and recipe.fit_whole_budget and req.output_fit_steps is None:
            fit_steps = budget.forward_passes or 10**9  # a time budget stops it (time_share)
        if budget and budget.forward_passes is not None:
            fit_steps = min(fit_steps, budget.forward_passes)  # the fit's passes count in the budget
        brought = req.init_adapter is not None and (Path(req.init_adapter) / OUTPUT_ADAPTER_WEIGHTS).is_file()
        if encoder and recipe is None and req.output_fit_steps is None:
            fit_steps = 0  # a named optimizer searches from the probe as it always did; --output-fit-steps N fits first
        # the encoder fit starts from the probe's own scale and calibrates its result on the held-out data
        calibrate = encoder and fit_steps > 0 and not brought and eval_enc is not None
        theta, how = starting_adapter(bundle, train_enc, req.seed, req.init_adapter, temper=not calibrate)
        if fit_steps and not brought:
            started_fit = time.perf_counter()
            deadline = budget.seconds if budget and budget.seconds is not None else float("inf")
            stepped = has_bias or encoder or (has_label_probe and bundle.manifest.top_blocks is not None)
            bar = _fit_progress(req, fit_steps, budget) if stepped else _FitBar()  # the probes take one pass
            try:
                theta, output_fit, what = fit_output_adapter(
                    bundle, train_enc, eval_enc, theta, batch_size, req.seed, fit_steps, req.eval_every,
                    time_share=lambda: (time.perf_counter() - started_fit) / deadline, on_step=bar, calibrate=calibrate)
            finally:
                bar.close()
            bundle.close_below()  # a search that follows runs the whole graph
            if output_fit:
                how += what
                fit_cost = (output_fit["forward_passes"], time.perf_counter() - started_fit)
                log(f"output adapter: {describe_fit(output_fit)}")
    settings = {**req.settings, "total_steps": _horizon(req, name, steps, budget), "seed": req.seed,
                "steps_per_epoch": max(1, len(train_enc) // batch_size), "examples": len(train_enc)}
    if name in POPULATION and settings.get("projection") == "hidden":
        settings["layer_std"] = layer_input_std(bundle, train_enc, batch_size)  # base model: the same on --resume
    if needs_input_bases(name, settings):
        from edgeft.runtime.statistics import layer_input_bases

        k = int(settings.get("rank") or 16)
        # base model: the same on --resume; small batches: every layer's hidden states are outputs here
        bases = layer_input_bases(bundle, train_enc, k, min(batch_size, BASES_BATCH))
        settings["input_bases"] = [u for u, _ in bases] if bases else None
    # the output side is fitted from exact gradients, never searched (runtime/optimizers/frozen.py)
    trainable = searched_tensors(bundle.layout, bundle.manifest)
    optimizer = make_optimizer(name, theta, layout=bundle.layout, trainable=trainable, **settings)
    config = TrainConfig(steps=steps, batch_size=batch_size, eval_every=req.eval_every, seed=req.seed, budget=budget)
    trainer = Trainer(bundle, train_enc, optimizer, config, eval_set=eval_enc, run_dir=run_dir)
    trainer.evaluator.forward_passes, trainer.elapsed_s = fit_cost  # the fit spends the same budget
    if output_fit and "eval_after" in output_fit:
        # the fit scored the vector it returns on the run's held-out data: the trainer ranks from that score
        # (a fit that never opened the whole graph must not open it for this when no search follows)
        trainer.adopt_start(output_fit["eval_after"] if output_fit["kept"] else output_fit["eval_before"])
    elif output_fit and "train_after" in output_fit:  # the prompt fit without held-out data: on the training set
        trainer.adopt_start(output_fit["train_after"])
    if req.resume:
        trainer.resume()
        log(f"resuming at step {optimizer.step}, {trainer.evaluator.forward_passes} forward passes, "
            f"{trainer.elapsed_s:.0f} s spent" + (f" of {budget.describe()}" if budget else f"; until step {steps}"))
    else:
        batch_text = "the whole set per step" if batch_size >= len(train_set) else f"batch {batch_size}"
        log(f"start: {how}; {len(train_set)} training examples, {batch_text}, {bundle.layout.size:,} trainable values"
            + (f"; budget {budget.describe()}" if budget else ""))

    on_step, on_eval, close = _progress(req, trainer, steps, budget)
    started = time.perf_counter()
    try:
        summary = trainer.fit(on_step=on_step, on_eval=on_eval)
    finally:
        close()
    adapter_dir = run_dir / "adapter"
    save_adapter(adapter_dir, bundle.layout, trainer.best, bundle.manifest.peft_base.get("source", ""),
                 _peft_task_type(bundle.task))
    if hasattr(optimizer, "distribution"):  # monteclora: the spread beside the mean (edgeft/distribution.py)
        save_distribution(adapter_dir, bundle.layout, optimizer.distribution())
    summary.update(adapter=str(adapter_dir), optimizer=name, recipe=recipe.why if recipe else None,
                   output_fit=output_fit, held_back_windows=held_back, run_wall_s=round(time.perf_counter() - started, 2))
    plot = learning_curve_in_child(run_dir / "metrics.jsonl", run_dir / "curve.png", f"{name} on {Path(req.bundle).name}")
    summary["plot"] = str(plot) if plot else None
    warning = budget_warning(summary["peak_rss_mb"], profile.memory_budget_mb, profile.name)
    summary["memory_warning"] = warning
    if warning:
        log(f"warning: {warning}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _fit_alone(bundle, req: TrainRequest, budget) -> bool:
    """Whether this run is the top-blocks fit alone, which never opens the whole graph (``TopBlocks.standalone``):
    the default recipe on a causal LM or a causal prompt with a budget the fit takes whole, not resumed."""
    from edgeft.adapters import OUTPUT_ADAPTER_WEIGHTS
    from edgeft.runtime.output_fit import label_probe_tensors, output_bias_slice

    top = bundle.manifest.top_blocks
    return (top is not None and top.standalone() and req.optimizer == "auto" and budget is not None and not req.resume
            and req.output_fit_steps is None and (output_bias_slice(bundle) is not None or label_probe_tensors(bundle))
            and not (req.init_adapter and (Path(req.init_adapter) / OUTPUT_ADAPTER_WEIGHTS).is_file()))


def _planned_batch(req: TrainRequest, profile, fit_alone: bool, batch_size: int, log) -> int:
    """Before any work: the memory plan (runtime/plan.py) for this batch; a one-line error naming the batch that
    fits when it does not; with --batch-size auto, the largest batch that fits (at most the planned one)."""
    from edgeft.runtime.plan import describe, plan_memory

    if profile.memory_budget_mb is None:
        raise EdgeftError(f"--batch-size auto fits the device's memory budget: profile '{profile.name}' sets no "
                          "memory_budget_mb (pass --device)")
    plan = plan_memory(req.bundle, req.device, batch_size, output_fit=req.output_fit_steps != 0,
                       search=not fit_alone)
    if plan.fits:
        return batch_size
    if not plan.largest_batch_size:
        raise EdgeftError(f"this bundle needs ~{plan.predicted_train_peak_rss_mb:.0f} MB even at batch 1 "
                          f"(device budget {plan.budget_mb:.0f} MB): use a smaller model or a lighter bundle "
                          "(edgeft compress --quantize int4)")
    if req.fit_memory:
        log(f"--batch-size auto: {plan.largest_batch_size} ({describe(plan, profile.name)})")
        return plan.largest_batch_size
    raise EdgeftError(f"batch {batch_size} needs ~{plan.predicted_train_peak_rss_mb:.0f} MB, more than device "
                      f"'{profile.name}' allows ({plan.budget_mb:.0f} MB): --batch-size {plan.largest_batch_size} fits "
                      "(or pass --batch-size auto)")


def _peft_task_type(task: str) -> str | None:
    return {"causal-lm": "CAUSAL_LM"}.get(task)


def _horizon(req: TrainRequest, name: str, steps: int | None, budget) -> int:
    """The steps the optimizer's schedules (warm-up, linear decay, AdaZeta's epochs) plan for."""
    from edgeft.runtime.optimizers import forwards_per_step

    if steps is not None:
        return steps
    if budget.forward_passes is not None:
        return max(1, budget.forward_passes // forwards_per_step(name, req.settings))
    return DEFAULT_STEPS


BASES_BATCH = 8  # rows per pass when measuring the layers' input directions (zo-activations)
STOP_WINDOWS = 16  # text windows a causal LM's run holds back to rank its adapters, when no --eval-data is given


def _held_back_split(train):
    """A causal LM's training windows without every 10th (at most ``STOP_WINDOWS``), and those windows:
    a long exact-gradient fit can over-fit the training text, and text, unlike k-shot labels, is
    plentiful enough to hold some back for choosing where to stop."""
    from edgeft.runtime.bundle import Encoded

    held = set(range(0, len(train), 10)[:STOP_WINDOWS])
    rest = [x for i, x in enumerate(train.ids) if i not in held]
    return Encoded(rest, None), Encoded([train.ids[i] for i in sorted(held)], None)


class _FitBar:
    """The output fit's progress: a tqdm bar over its steps with the training loss (silent under --json)."""

    def __init__(self, bar=None):
        self.bar = bar

    def __call__(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fit_progress(req: TrainRequest, fit_steps: int, budget) -> _FitBar:
    if not req.progress:
        return _FitBar()
    from tqdm import tqdm

    total = fit_steps if fit_steps < 10**9 else None  # a time budget: steps unknown, the bar counts
    return _FitBar(tqdm(total=total, desc="output fit", unit="fwd", dynamic_ncols=True))


def _progress(req: TrainRequest, trainer, steps: int | None, budget):
    """A tqdm bar over the budget (forward passes or seconds) or the steps, with the running
    loss, the best score so far and the lr; silent when --json asks for quiet."""
    if not req.progress:
        return None, None, lambda: None
    from tqdm import tqdm

    if budget is not None and budget.forward_passes is not None:
        unit, total, used = "fwd", budget.forward_passes, lambda: trainer.evaluator.forward_passes
    elif budget is not None:
        unit, total, used = "s", round(budget.seconds), lambda: round(trainer._elapsed())
    else:
        unit, total, used = "step", steps, lambda: trainer.optimizer.step
    bar = tqdm(total=total, initial=min(used(), total), desc="train", unit=unit, dynamic_ncols=True)
    recent: list[float] = []
    metric = "perplexity" if trainer.bundle.task == "causal-lm" else "accuracy"

    def on_step(report):
        if not report.skipped:
            recent.append(report.loss)
            del recent[:-20]
        elif report.message:
            bar.write(f"warning: {report.message}")
        best = (trainer.best_metrics or {}).get(metric)
        bar.set_postfix(loss=f"{np.mean(recent):.4f}" if recent else "nan", best=f"{best:.4g}" if best is not None else "-",
                        lr=f"{report.lr:.2g}", refresh=False)
        bar.update(min(used(), total) - bar.n)

    def on_eval(step, metrics):
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "examples"))
        if trainer.records and "rolled_back" in trainer.records[-1]:
            bar.write(f"warning: diverged; {trainer.records[-1]['rolled_back']}")

    return on_step, on_eval, bar.close
