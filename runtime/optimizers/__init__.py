"""Forward-only optimizers behind one ask/tell interface; one registry line each."""

from __future__ import annotations

from .base import Optimizer, StepReport
from .mezo import MeZO, MeZOConfig

# name -> (optimizer class, config class)
REGISTRY = {
    "mezo": (MeZO, MeZOConfig),
}


def make_optimizer(name: str, theta, **settings) -> Optimizer:
    from edgeft.errors import EdgeftError

    if name not in REGISTRY:
        raise EdgeftError(f"unknown optimizer {name!r} (known: {', '.join(sorted(REGISTRY))})")
    cls, config_cls = REGISTRY[name]
    known = set(config_cls.__dataclass_fields__)
    try:
        config = config_cls(**{k: v for k, v in settings.items() if k in known and v is not None})
    except ValueError as err:
        raise EdgeftError(f"--optimizer {name}: {err}") from None
    return cls(theta, config)


__all__ = ["REGISTRY", "MeZO", "MeZOConfig", "Optimizer", "StepReport", "make_optimizer"]
