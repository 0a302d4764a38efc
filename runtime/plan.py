"""``edgeft plan``: the peak memory of ``train`` and ``eval`` predicted from short probes, before any work.

A run that does not fit a device's memory should be told so before it starts, not after. Each probe is
a fresh process (its peak RSS is its own) that opens the bundle and runs the real code path once on a
synthetic batch: the training step's candidate evaluations (``CandidateEvaluator``, two candidates as
MeZO's step) or ``evaluate``. Two probe sizes give peak ≈ a + b·tokens per path (weights, runtime and
arena in a; activations and logits in b·tokens of one session run). A causal LM runs its batches in row
chunks (``causal_lm_rows``: its logits bound the chunk), so its tokens per run are chunk rows × length,
however large the batch; the probe reports that chunk size. The prediction adds the optimizer's vectors and,
for a causal LM with the top-MLP fit, that fit's numpy weights. Training also evaluates held-out data
at ``EVAL_BATCH`` rows, so its peak is the larger of the two paths. A BERT-family classifier's encoder fit
(numpy, in chunks of ``encoder_blocks.ROWS`` examples whatever the batch) is a third probe: one step of it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# (rows, length) of the two probes per path: a short one, and 4 rows at the planned length (a causal LM's
# session runs are then the exact shape the plan predicts: SmolLM2's eval probe at 4 x 64 peaked 818, 998 or
# 1,046 MB from one process to the next and its line over-predicted eval by 34%; at 1 x 128, 883.5-883.6 MB,
# against 886 MB measured for the real eval)
SHORT_PROBE = (1, 16)
PROBE_ROWS = 4
EVAL_BATCH = 32  # rows of a held-out evaluation during training (TrainConfig.eval_batch_size) and of edgeft eval
MAX_BATCH = 4096  # what "the largest batch that fits" reports when activations cost next to nothing
TOP_FIT_OVERHEAD = 1.1  # the top-MLP fit's memory over its weights file (SmolLM2: 117 MB file)
OPTIMIZER_VECTORS = 8  # adapter-sized float32 vectors an optimizer holds (θ, best, candidates, direction, moments)


@dataclass
class Plan:
    predicted_train_peak_rss_mb: float
    predicted_eval_peak_rss_mb: float
    budget_mb: float | None
    fits: bool
    batch_size: int
    max_length: int
    largest_batch_size: int | None  # at max_length, within the budget (None: no budget)
    probes: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def _probe(folder: Path, device: str | None, path: str, rows: int, length: int) -> tuple[float, int | None]:
    """(peak RSS MB, the most rows a session run takes: None for no limit) of one probe process."""
    cmd = [sys.executable, "-m", "edgeft.runtime.plan", str(folder), path, str(rows), str(length), device or ""]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        from edgeft.errors import EdgeftError

        raise EdgeftError(f"memory probe failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return float(report["peak_rss_mb"]), report["rows_per_run"]


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of peak = a + b·tokens through the two probes (b ≥ 0: noise must not predict less for more)."""
    (t1, m1), (t2, m2) = points
    if t2 == t1:  # one token per run either way (a length-1 plan): the larger peak, no slope
        return max(m1, m2), 0.0
    b = max(0.0, (m2 - m1) / (t2 - t1))
    return m1 - b * t1, b


def plan_memory(folder: Path, device: str | None = None, batch_size: int | None = None,
                max_length: int | None = None, output_fit: bool = True, search: bool = False) -> Plan:
    """``output_fit``: whether training fits a causal LM's output side first (the default recipe; False
    for ``--output-fit-steps 0``), which holds the fit's weights in numpy. ``search``: whether a search on
    the whole graph follows the fit (``--steps``, a named optimizer); without one, a bundle whose top-blocks
    fit runs without the whole graph (``TopBlocks.standalone``) trains at the fit's own peak, which a
    third probe measures (its weights, the graph below the blocks, one sequence's saved values)."""
    from edgeft.manifest import Manifest

    from .devices import load_profile

    profile = load_profile(device)
    manifest = Manifest.load(folder)
    batch_size = batch_size or profile.batch_size
    length = min(max_length or manifest.max_length, manifest.max_length)
    alone = output_fit and not search and manifest.top_blocks is not None and manifest.top_blocks.standalone()
    encoder = output_fit and manifest.encoder_blocks is not None and manifest.task == "classification"
    probes, fits_of, rows_per_run = [], {}, None
    encoder_fit = None
    if encoder:  # its chunks of ROWS examples, whatever the batch: one probe at the planned length
        from .encoder_blocks import ROWS

        encoder_fit, _ = _probe(Path(folder), device, "encoder-fit", ROWS, length)
        probes.append({"path": "encoder-fit", "rows": ROWS, "length": length, "peak_rss_mb": round(encoder_fit, 1)})
    for path in ("fit" if alone else "train", "eval"):
        points = []
        for rows, probe_length in _probe_shapes(length):
            peak, rows_per_run = _probe(Path(folder), device, path, rows, probe_length)
            probes.append({"path": path, "rows": rows, "length": probe_length, "peak_rss_mb": round(peak, 1)})
            # the fit runs its batch whole (the graph below the blocks returns no logits)
            points.append(((rows if path == "fit" else _run_rows(rows, rows_per_run)) * probe_length, peak))
        fits_of[path] = _line(points)
    # the standalone fit's probe already holds its weights: only the optimizer's vectors are extra
    extra = _extra_mb(Path(folder), manifest, output_fit and not alone, length)
    return predict(fits_of["fit" if alone else "train"], fits_of["eval"], extra, profile.memory_budget_mb,
                   batch_size, length, probes, rows_per_run, fit_alone=alone, fit_peak=encoder_fit)


def _probe_shapes(length: int) -> tuple[tuple[int, int], tuple[int, int]]:
    rows, short = SHORT_PROBE
    return (rows, min(short, max(1, length // 4))), (PROBE_ROWS, length)


def _run_rows(rows: int, rows_per_run: int | None) -> int:
    return rows if rows_per_run is None else min(rows, rows_per_run)


def predict(train: tuple[float, float], held_out: tuple[float, float], extra: float, budget: float | None,
            batch_size: int, length: int, probes: list[dict] | None = None, rows_per_run: int | None = None,
            fit_alone: bool = False, fit_peak: float | None = None) -> Plan:
    """The plan from the two paths' lines (a, b), the memory the probes do not see and the budget.
    ``rows_per_run``: the most rows one session run takes (a causal LM's chunk; None: the whole batch).
    ``fit_alone``: the train line is the standalone top-blocks fit's, which runs its batch whole and never
    opens the whole graph (its held-out scoring is part of that line, not the eval path's).
    ``fit_peak``: the encoder fit's own peak (its probe's), which no batch size changes: its chunks are fixed."""
    a_train, b_train = train
    a_eval, b_eval = held_out
    eval_peak = a_eval + b_eval * _run_rows(EVAL_BATCH, rows_per_run) * length
    train_peak = a_train + b_train * (batch_size if fit_alone else _run_rows(batch_size, rows_per_run)) * length
    train_peak = max(train_peak if fit_alone else max(train_peak, eval_peak), fit_peak or 0.0) + extra
    largest = None
    if budget is not None:
        room = budget - extra - a_train
        largest = max(0, min(MAX_BATCH, math.floor(room / (b_train * length)))) if b_train > 0 else MAX_BATCH
        if not fit_alone and rows_per_run is not None and largest >= rows_per_run:
            largest = MAX_BATCH  # a bigger batch only adds chunks, not memory
        if not fit_alone and (eval_peak + extra > budget or room < 0) or (fit_peak or 0.0) + extra > budget:
            largest = 0  # the held-out evaluation, the encoder fit, or the bundle itself, does not fit
    fits = budget is None or (train_peak <= budget and eval_peak <= budget)
    return Plan(round(train_peak, 1), round(eval_peak, 1), budget, fits, batch_size, length, largest, probes or [])


def _extra_mb(folder: Path, manifest, output_fit: bool, length: int) -> float:
    """Memory the probes do not see: the optimizer's vectors and the exact fit's weights and saved values."""
    from edgeft.adapters import bundle_layout

    size = bundle_layout(folder, manifest).size
    extra = OPTIMIZER_VECTORS * size * 4 / 2**20
    if manifest.top_blocks is not None and output_fit:
        # one copy of the weights, read in place (edgeft/tensor_file.py), + what the backward keeps of one
        # sequence (runtime/top_blocks.py: one sequence at a time)
        extra += (folder / manifest.top_blocks.weights).stat().st_size / 2**20 + _saved_activations_mb(folder, manifest, length)
    elif manifest.top_mlp is not None and output_fit:
        # its weights + the down projection in float64 and a softmax chunk
        extra += TOP_FIT_OVERHEAD * (folder / manifest.top_mlp.weights).stat().st_size / 2**20
    return extra


def _saved_activations_mb(folder: Path, manifest, length: int) -> float:
    """The top blocks' forward values the backward keeps, for one sequence of max_length tokens: per block
    the residual before and after attention (hidden each), gate and up (intermediate each), q (heads x
    head_dim), k and v (kv_heads x head_dim each); the attention weights and output are recomputed, one
    block's at a time."""
    from edgeft.block_weights import matrix_shapes
    from edgeft.tensor_file import tensor_shapes

    top = manifest.top_blocks
    try:
        shapes = matrix_shapes(tensor_shapes(folder / top.weights))
        intermediate, hidden = shapes[f"{top.layers[0]}.gate"]
    except (OSError, ValueError, KeyError, TypeError):  # the fit itself reports what is wrong with the file
        return 0.0
    per_block = length * (2 * hidden + 2 * intermediate + (top.heads + 2 * top.kv_heads) * top.head_dim)
    return (len(top.layers) * per_block + top.heads * length**2 + length * hidden) * 4 / 2**20


def describe(plan: Plan, device: str) -> str:
    return (f"predicted peak memory: train {plan.predicted_train_peak_rss_mb:.0f} MB, eval {plan.predicted_eval_peak_rss_mb:.0f} MB"
            f" at batch {plan.batch_size}, length {plan.max_length}"
            + (f"; device '{device}' budget {plan.budget_mb:.0f} MB: " + ("fits" if plan.fits else "does NOT fit")
               + (f"; the largest batch that fits: {plan.largest_batch_size}" if plan.largest_batch_size is not None else "")
               if plan.budget_mb is not None else ""))


def _run_probe(folder: str, path: str, rows: int, length: int, device: str | None) -> dict:
    """In the probe's own process: open the bundle, run one step of ``path`` on synthetic rows."""
    import numpy as np

    from .bundle import Bundle, Encoded
    from .devices import load_profile
    from .evaluate import CandidateEvaluator, causal_lm_rows, evaluate
    from .memory import peak_rss_mb

    bundle = Bundle(folder, load_profile(device), open_graph=path not in ("fit", "encoder-fit"))
    # real token ids (a random id could lie outside a model's embedding table)
    sentence = np.asarray(bundle.tokenizer.encode("the quick brown fox jumps over the lazy dog " * 8).ids, dtype=np.int64)
    row = np.resize(sentence, length)
    ids = [row.copy() for _ in range(rows)]
    labels = None if bundle.task == "causal-lm" else np.zeros(rows, dtype=np.int64)
    encoded = Encoded(ids, labels)
    theta = bundle.layout.initial(0)
    if path == "fit":
        fit_step(bundle, encoded, theta)
    elif path == "encoder-fit":  # one step of the real fit, scored on the same rows as its held-out data
        from .encoder_fit import EncoderFitConfig, fit_encoder

        fit_encoder(bundle, encoded, theta, rows, config=EncoderFitConfig(steps=1), held_out=encoded)
    elif path == "train":
        CandidateEvaluator(bundle).losses(bundle.feeds(encoded, np.arange(rows)), [theta, theta.copy()])
    else:
        evaluate(bundle, theta, encoded, rows)
    # (the fit's probe must not open the whole graph just to read the logits' shape)
    chunk = causal_lm_rows(bundle, MAX_BATCH) if bundle.task == "causal-lm" and path not in ("fit", "encoder-fit") else None
    return {"peak_rss_mb": peak_rss_mb(), "rows_per_run": chunk}


def fit_step(bundle, encoded, theta) -> None:
    """One step of the standalone top-blocks fit, as ``output_fit.fit_lm_output`` (or a prompt bundle's
    ``prompt_fit.fit_prompt``) takes it (the whole graph never opened): what the plan's fit probe measures."""
    import numpy as np

    from .top_blocks import TopBlocksFit

    fit = TopBlocksFit(bundle.folder, bundle.manifest, bundle.below_session)
    named = bundle.layout.unflatten(theta)
    into = {n: np.zeros(named[n].shape) for n in fit.tensor_names()}
    feeds = bundle.feeds(encoded, np.arange(len(encoded)))
    if fit.label_tokens is not None:  # a prompt bundle's fit (runtime/prompt_fit.py): the answer position only
        into.update({n: np.zeros(named[n].shape) for n in (fit.output_weight, fit.bias)})
        fit.accumulate_answers(feeds, fit.entering(feeds, named), named, into)
        return
    into["bias"] = np.zeros(named[fit.bias].shape)
    fit.accumulate(feeds, fit.entering(feeds, named), named, into)


if __name__ == "__main__":
    folder, which, n_rows, n_length, dev = sys.argv[1:6]
    print(json.dumps(_run_probe(folder, which, int(n_rows), int(n_length), dev or None)))
