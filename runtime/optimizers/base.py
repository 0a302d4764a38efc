"""The ask/tell contract between optimizers and the runtime (as in pycma).

An optimizer never runs the model. ``ask()`` returns candidate adapter vectors;
the runtime evaluates them on one batch and hands the losses to ``tell()``, which
updates the optimizer's state and returns a ``StepReport``. ``state_dict()`` holds
everything needed to continue bit-identically after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class StepReport:
    step: int  # the step that just finished (1-based)
    loss: float  # the loss this step reports (mean over its candidates)
    lr: float
    skipped: bool = False
    message: str | None = None
    seeds: list[list[int]] = field(default_factory=list)
    projected_grads: list[float] = field(default_factory=list)


class Optimizer(Protocol):
    name: str
    step: int

    @property
    def theta(self) -> np.ndarray:
        """The current adapter vector."""

    def ask(self) -> list[np.ndarray]: ...

    def tell(self, candidates: list[np.ndarray], losses: np.ndarray) -> StepReport: ...

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, JSON-able scalars)."""

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict) -> None: ...
