"""Device profiles (``devices/*.toml``): threads, execution providers, batch, length, memory budget."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from edgeft.errors import EdgeftError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "devices"


@dataclass
class DeviceProfile:
    name: str = "default"
    description: str = ""
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int = 0  # 0: one per core
    batch_size: int = 16
    max_length: int = 128
    memory_budget_mb: float | None = None
    # classification/prompt: a training set of at most this many examples is evaluated whole in every
    # forward pass (when --batch-size is not given); a causal LM always trains in batches of batch_size
    whole_set_max: int = 64
    budget: str | None = None  # default training budget when --steps/--budget are not given ("20m", "4000fwd")
    # false: ONNX Runtime computes with the weights as loaded instead of repacking each for its matrix kernels
    # beside the original. Measured on SmolLM2-135M (one thread, 1 x 128 tokens, peak after the runs): int8
    # 655 -> 604 MB at 14% slower; fp32 and int4 no smaller, 28% and 2x slower. A last resort for tight memory.
    prepack_weights: bool = True

    @property
    def intra_op_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str | None) -> DeviceProfile:
    """A profile by name (``devices/NAME.toml``) or by path; ``None`` gives the defaults."""
    if not name_or_path:
        return DeviceProfile()
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise EdgeftError(f"unknown device {name_or_path!r} (known: {', '.join(available_profiles())}, or a .toml path)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise EdgeftError(f"{path}: not valid TOML ({err})") from None
    known = set(DeviceProfile.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EdgeftError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    profile = DeviceProfile(**raw)
    if profile.batch_size < 1 or profile.max_length < 4 or profile.threads < 0 or profile.whole_set_max < 0:
        raise EdgeftError(f"{path}: batch_size, max_length, threads and whole_set_max must be positive")
    if not isinstance(profile.prepack_weights, bool):
        raise EdgeftError(f"{path}: prepack_weights must be true or false")
    if profile.memory_budget_mb is not None and profile.memory_budget_mb <= 0:
        raise EdgeftError(f"{path}: memory_budget_mb must be positive")
    if profile.budget is not None:
        from .budget import parse_budget

        try:
            parse_budget(profile.budget)
        except EdgeftError as err:
            raise EdgeftError(f"{path}: budget: {err}") from None
    return profile
