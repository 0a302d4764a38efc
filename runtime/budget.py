"""Training budgets in the user's units: wall time (``20m``) or forward passes (``4000fwd``).

A device owner knows how long a phone may charge overnight or how many forward passes an
app may spend, not how many optimizer steps that is (a MeZO step costs 2 passes, a CMA-ES
generation 20). The trainer stops cleanly when the budget is spent, saves, and ``--resume``
with a larger budget continues the same run (budgets are totals over the run, not per call).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgeft.errors import EdgeftError

_TIME_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Budget:
    seconds: float | None = None  # wall time of the whole run (steps, evaluations, start fit)
    forward_passes: int | None = None  # training forward passes (held-out evaluations are not counted)

    def spent(self, elapsed_s: float, forward_passes: int) -> bool:
        if self.seconds is not None and elapsed_s >= self.seconds:
            return True
        return self.forward_passes is not None and forward_passes >= self.forward_passes

    def describe(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds:g} s"
        return f"{self.forward_passes} forward passes"


def parse_budget(text: str) -> Budget:
    """``"20m"``, ``"90s"``, ``"1.5h"`` or ``"4000fwd"``; anything else is a one-line error."""
    match = _PATTERN.match(str(text).lower())
    if not match:
        raise EdgeftError(f"--budget {text!r}: expected a time (90s, 20m, 1.5h) or forward passes (4000fwd)")
    value, unit = float(match.group(1)), match.group(2)
    if value <= 0:
        raise EdgeftError(f"--budget {text!r}: must be more than zero")
    if unit == "fwd":
        if value != int(value):
            raise EdgeftError(f"--budget {text!r}: forward passes are a whole number")
        return Budget(forward_passes=int(value))
    if unit not in _TIME_UNITS:
        raise EdgeftError(f"--budget {text!r}: unknown unit {unit!r} (s, m, h or fwd)")
    return Budget(seconds=value * _TIME_UNITS[unit])
