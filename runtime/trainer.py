"""The training loop: sample a batch, ask, evaluate candidates, tell, log, keep the best.

Everything random is a function of (seed, step) — the batch order and the
optimizer's perturbations — so a run resumed from a checkpoint takes exactly the
steps the uninterrupted run would have taken, bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeft.data import epoch_batch
from edgeft.errors import EdgeftError

from .budget import Budget
from .bundle import Bundle, Encoded
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import CandidateEvaluator, evaluate
from .memory import peak_rss_mb
from .optimizers import Optimizer, StepReport

METRICS = "metrics.jsonl"
# Divergence guard: an evaluation this much worse than the best so far (held-out loss ratio)
# rolls a zeroth-order optimizer back to the best adapter with half the lr.
DIVERGENCE_LOSS_RATIO = 1.5
CHECKPOINT = "checkpoint"
BATCH_STREAM = 7  # the batch order's random stream (edgeft.data.epoch_batch)


@dataclass
class TrainConfig:
    steps: int | None = 500  # None: until the budget is spent
    batch_size: int = 16
    eval_every: int = 50
    eval_batch_size: int = 32
    checkpoint_every: int = 50
    seed: int = 0
    budget: Budget | None = None

    def __post_init__(self):
        if self.steps is None and self.budget is None:
            raise ValueError("a run needs steps or a budget")


def higher_is_better(task: str) -> bool:
    return task != "causal-lm"


def rank_key(task: str, metrics: dict, held_out: bool) -> tuple[float, ...]:
    """What the kept adapter is ranked by (larger is better).

    On held-out data: accuracy, then minus the loss where accuracies tie (a causal LM: minus
    the loss). On the training set itself the loss alone: a linear probe fitted on a k-shot
    set usually classifies that set perfectly, so accuracy would tie at 1.0 forever and the
    start would always be kept, however far training lowered the loss.
    """
    if not higher_is_better(task) or not held_out:
        return (-metrics["loss"],)
    return (metrics["accuracy"], -metrics["loss"])


class Trainer:
    def __init__(
        self,
        bundle: Bundle,
        train: Encoded,
        optimizer: Optimizer,
        config: TrainConfig = TrainConfig(),
        eval_set: Encoded | None = None,
        run_dir: str | Path | None = None,
    ):
        self.bundle, self.train, self.optimizer, self.config = bundle, train, optimizer, config
        # Without held-out data, the best adapter is the one with the lowest loss on
        # the whole few-shot set (what the DFO paper optimises).
        self.eval_set = eval_set if eval_set is not None else train
        self.held_out = eval_set is not None
        self.run_dir = Path(run_dir) if run_dir else None
        self.evaluator = CandidateEvaluator(bundle)
        self.best = np.array(optimizer.theta, copy=True)
        self.best_score: tuple[float, ...] = (-np.inf,)
        self.best_step, self.best_metrics = 0, None
        self.start_metrics: dict | None = None
        self.wall_s = 0.0  # time in training steps
        self.elapsed_s = 0.0  # the whole run's time (steps, evaluations, saves): what a time budget counts
        self.best_forward_passes, self.best_elapsed_s = 0, 0.0
        self.stopped_by = None
        self.records: list[dict] = []  # what metrics.jsonl holds
        self._whole_set: dict | None = None
        self._clock: float | None = None  # perf_counter at the start of fit(), while it runs

    # --- data order ---------------------------------------------------------

    def batch_index(self, step: int) -> np.ndarray:
        """Rows of the batch for ``step``: a fresh permutation of the training set each epoch."""
        return epoch_batch(len(self.train), self.config.batch_size, self.config.seed, BATCH_STREAM, step)

    # --- one step -----------------------------------------------------------

    def _feeds(self, step: int) -> dict:
        """Padded inputs for a step; a training set that fits one batch is padded once and reused."""
        if len(self.train) <= self.config.batch_size:
            if self._whole_set is None:
                self._whole_set = self.bundle.feeds(self.train, np.arange(len(self.train)))
            return self._whole_set
        return self.bundle.feeds(self.train, self.batch_index(step))

    def step(self) -> StepReport:
        start = time.perf_counter()
        feeds = self._feeds(self.optimizer.step)
        candidates = self.optimizer.ask()
        losses = self.evaluator.losses(feeds, candidates)
        report = self.optimizer.tell(candidates, losses)
        self.wall_s += time.perf_counter() - start
        self._log({"step": report.step, "loss": report.loss, "lr": report.lr, "skipped": report.skipped,
                   "seeds": report.seeds, "projected_grads": report.projected_grads,
                   "forward_passes": self.evaluator.forward_passes, "wall_s": round(self.wall_s, 3)})
        return report

    def evaluate(self, adapter: np.ndarray | None = None) -> dict:
        adapter = self.optimizer.theta if adapter is None else adapter
        return evaluate(self.bundle, adapter, self.eval_set, self.config.eval_batch_size)

    def _consider(self) -> dict:
        """Evaluate the current adapter; keep it if it is the best so far; roll back if it diverged."""
        metrics = self.evaluate()
        score = rank_key(self.bundle.task, metrics, self.held_out)
        record = {"step": self.optimizer.step, "eval": metrics}
        if score > self.best_score:
            self.best, self.best_score = np.array(self.optimizer.theta, copy=True), score
            self.best_step, self.best_metrics = self.optimizer.step, metrics
            self.best_forward_passes, self.best_elapsed_s = self.evaluator.forward_passes, self._elapsed()
        elif self._diverged(metrics) and hasattr(self.optimizer, "roll_back"):
            self.optimizer.roll_back(self.best)
            record["rolled_back"] = f"eval loss {metrics['loss']:.4g} vs best {self.best_metrics['loss']:.4g}: " \
                                    f"back to step {self.best_step}'s adapter, lr lowered to {self.optimizer.lr():.3g}"
        self._log(record)
        return metrics

    def _diverged(self, metrics: dict) -> bool:
        loss, best = metrics["loss"], (self.best_metrics or {}).get("loss")
        return not np.isfinite(loss) or (best is not None and loss > DIVERGENCE_LOSS_RATIO * best)

    def adopt_start(self, metrics: dict) -> None:
        """Rank the start on ``metrics``, its score on the data this run ranks on (held-out data, or without it
        the training set) computed already (by the output fit), instead of evaluating it again."""
        self.start_metrics = self.best_metrics = metrics
        self.best_score = rank_key(self.bundle.task, metrics, self.held_out)
        self.best, self.best_step = np.array(self.optimizer.theta, copy=True), self.optimizer.step
        self._log({"step": self.optimizer.step, "eval": metrics})

    # --- the loop -----------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_s + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def budget_spent(self) -> bool:
        c = self.config
        if c.steps is not None and self.optimizer.step >= c.steps:
            self.stopped_by = "steps"
            return True
        if c.budget is not None and c.budget.spent(self._elapsed(), self.evaluator.forward_passes):
            self.stopped_by = "budget"
            return True
        return False

    def fit(self, on_step: Callable[[StepReport], None] | None = None, on_eval: Callable[[int, dict], None] | None = None) -> dict:
        c = self.config
        self._clock = time.perf_counter()
        try:
            if self.start_metrics is None:
                self.start_metrics = self._consider()
                if on_eval:
                    on_eval(0, self.start_metrics)
            evaluated = self.optimizer.step
            while not self.budget_spent():
                report = self.step()
                if on_step:
                    on_step(report)
                step = self.optimizer.step
                if step % c.eval_every == 0:
                    metrics, evaluated = self._consider(), step
                    if on_eval:
                        on_eval(step, metrics)
                if self.run_dir and step % c.checkpoint_every == 0:
                    self.save()
            # the last step, whatever stopped the run, is evaluated and saved (also when a budget spent
            # by the start's output fit left no step to take: --resume then has a checkpoint to extend)
            if evaluated != self.optimizer.step:
                metrics = self._consider()
                if on_eval:
                    on_eval(self.optimizer.step, metrics)
            if self.run_dir:
                self.save()
        finally:
            self.elapsed_s, self._clock = self._elapsed(), None
        return self.summary()

    def summary(self) -> dict:
        steps = [r for r in self.records if "loss" in r and not r["skipped"]]
        recent = [r["loss"] for r in steps[-10:]]
        return {
            "steps": self.optimizer.step,
            "forward_passes": self.evaluator.forward_passes,
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "final_train_loss": float(np.mean(recent)) if recent else None,
            "start": self.start_metrics,
            "best": self.best_metrics,
            "best_step": self.best_step,
            "forward_passes_to_best": self.best_forward_passes,
            "elapsed_s_to_best": round(self.best_elapsed_s, 2),
            "elapsed_s": round(self._elapsed(), 2),
            "stopped_by": self.stopped_by,
            "rollbacks": [r["rolled_back"] for r in self.records if "rolled_back" in r],
        }

    # --- metrics and checkpoints -------------------------------------------

    def _log(self, record: dict) -> None:
        self.records.append(record)
        if self.run_dir:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self) -> None:
        arrays, scalars = self.optimizer.state_dict()
        arrays = {f"optimizer.{k}": v for k, v in arrays.items()}
        arrays["best"] = self.best
        save_checkpoint(self.run_dir / CHECKPOINT, arrays, {
            "optimizer": self.optimizer.name, "optimizer_state": scalars, "trainer": asdict(self.config),
            "best_score": list(self.best_score), "best_step": self.best_step, "best_metrics": self.best_metrics,
            "start_metrics": self.start_metrics, "forward_passes": self.evaluator.forward_passes, "wall_s": self.wall_s,
            "elapsed_s": self._elapsed(), "best_forward_passes": self.best_forward_passes,
            "best_elapsed_s": self.best_elapsed_s,
        })

    def resume(self) -> None:
        """Continue from the run folder's checkpoint; later metric lines are dropped."""
        arrays, scalars = load_checkpoint(self.run_dir / CHECKPOINT)
        if scalars["optimizer"] != self.optimizer.name:
            raise EdgeftError(f"checkpoint was made by optimizer {scalars['optimizer']!r}, not {self.optimizer.name!r}")
        self.optimizer.load_state_dict({k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")},
                                       scalars["optimizer_state"])
        self.best = np.array(arrays["best"], dtype=np.float32)
        best = scalars["best_score"]  # a list; a single number in checkpoints from before rank_key
        self.best_score, self.best_step = (tuple(best) if isinstance(best, list) else (best,)), scalars["best_step"]
        self.best_metrics, self.start_metrics = scalars["best_metrics"], scalars["start_metrics"]
        self.evaluator.forward_passes, self.wall_s = scalars["forward_passes"], scalars["wall_s"]
        self.elapsed_s = scalars.get("elapsed_s", self.wall_s)
        self.best_forward_passes = scalars.get("best_forward_passes", 0)
        self.best_elapsed_s = scalars.get("best_elapsed_s", 0.0)
        step = self.optimizer.step
        path = self.run_dir / METRICS
        kept = []
        if path.is_file():
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [r for r in kept if r["step"] <= step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
