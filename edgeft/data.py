"""Labelled text from JSONL, CSV or TSV files, and few-shot sampling.

A data set is two parallel lists: texts and label ids (ids into the bundle's
labels). Labels in a file may be label names or integer ids. Every problem with a
file becomes one ``EdgeftError`` naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError


@dataclass
class Dataset:
    texts: list[str]
    labels: np.ndarray | None  # int64 ids, or None for unlabelled text (causal-lm)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index) -> "Dataset":
        index = np.asarray(index, dtype=np.int64)
        return Dataset([self.texts[i] for i in index], None if self.labels is None else self.labels[index])


def read_rows(path: Path, text_field: str = "text", label_field: str | None = "label") -> list[tuple[str, object]]:
    """Rows of (text, raw label) from a .jsonl/.json, .csv or .tsv file."""
    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeftError(f"{path}: not UTF-8 text") from None
    rows: list[tuple[str, object]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EdgeftError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise EdgeftError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(_pick(record, path, lineno, text_field, label_field))
    elif suffix in (".csv", ".tsv", ".tab"):
        delimiter = "," if suffix == ".csv" else "\t"
        reader = csv.DictReader(raw.splitlines(), delimiter=delimiter)
        if reader.fieldnames is None:
            raise EdgeftError(f"{path}: empty file (no header row)")
        for field_name in (text_field, label_field):
            if field_name and field_name not in reader.fieldnames:
                raise EdgeftError(f"{path}: no column {field_name!r} (columns: {', '.join(reader.fieldnames)})")
        try:
            for record in reader:
                rows.append(_pick(record, path, reader.line_num, text_field, label_field))
        except csv.Error as err:
            raise EdgeftError(f"{path}:{reader.line_num}: malformed {suffix[1:].upper()} ({err})") from None
    else:
        raise EdgeftError(f"{path}: unknown data format {suffix!r} (use .jsonl, .csv or .tsv)")
    if not rows:
        raise EdgeftError(f"{path}: no examples")
    return rows


def _pick(record: dict, path: Path, lineno: int, text_field: str, label_field: str | None) -> tuple[str, object]:
    if text_field not in record:
        raise EdgeftError(f"{path}:{lineno}: no field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str) or not text.strip():
        raise EdgeftError(f"{path}:{lineno}: field {text_field!r} is empty or not text")
    label = None
    if label_field:
        if label_field not in record or record[label_field] in (None, ""):
            raise EdgeftError(f"{path}:{lineno}: no field {label_field!r}")
        label = record[label_field]
    return text, label


def load_dataset(
    path: Path, labels: list[str] | None, text_field: str = "text", label_field: str = "label"
) -> Dataset:
    """Read a data file; with ``labels`` (classification/prompt) map every label to its id."""
    rows = read_rows(path, text_field, label_field if labels else None)
    texts = [t for t, _ in rows]
    if not labels:
        return Dataset(texts, None)
    ids = np.empty(len(rows), dtype=np.int64)
    by_name = {name: i for i, name in enumerate(labels)}
    for i, (_, raw) in enumerate(rows):
        ids[i] = _label_id(raw, by_name, len(labels), path, i + 1)
    return Dataset(texts, ids)


def _label_id(raw, by_name: dict[str, int], n: int, path: Path, row: int) -> int:
    if isinstance(raw, str) and raw in by_name:
        return by_name[raw]
    if isinstance(raw, bool):
        raise EdgeftError(f"{path}: row {row}: label {raw!r} is not one of {', '.join(by_name)}")
    if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().lstrip("-").isdigit()):
        value = int(raw)
        if 0 <= value < n:
            return value
        raise EdgeftError(f"{path}: row {row}: label id {value} is out of range 0..{n - 1}")
    raise EdgeftError(f"{path}: row {row}: unknown label {raw!r} (bundle labels: {', '.join(by_name)})")


def k_shot(data: Dataset, k: int, seed: int) -> Dataset:
    """``k`` examples per label, drawn with ``seed`` (balanced few-shot set)."""
    if data.labels is None:
        rng = np.random.default_rng(seed)
        return data.subset(np.sort(rng.permutation(len(data))[:k]))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(data.labels):
        pool = np.flatnonzero(data.labels == label)
        chosen.extend(rng.permutation(pool)[:k].tolist())
    return data.subset(np.sort(np.asarray(chosen)))


def epoch_batch(n: int, batch_size: int, seed: int, stream: int, step: int) -> np.ndarray:
    """Rows of the batch for ``step``: a fresh permutation of the ``n`` examples each epoch, drawn
    from (seed, stream, epoch) so that a resumed run takes the same batches; the whole set when it
    fits one batch. Each consumer has its own ``stream`` (the trainer 7, the causal LM's output fit 11)."""
    if n <= batch_size:
        return np.arange(n)
    per_epoch = n // batch_size
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, stream, epoch]).permutation(n)
    return np.sort(order[position * batch_size : (position + 1) * batch_size])
