"""``--optimizer auto``: the recipe a run uses when the user names none, chosen per task and bundle.

The rule follows what was measured here (README "Choosing a recipe", docs/LEARNING.md):

* causal LM with LoRA fitted exactly (a Llama bundle's top 80% of blocks' MLPs, ``export/top_blocks.py``;
  Mistral / Qwen2: the top layer's MLP, ``export/top_mlp.py``): the output bias and that LoRA fitted
  from their exact gradient for the whole budget, the lr falling linearly to zero over it, keeping the
  best point on held-out text; MeZO on the body gets what is left (SmolLM2/Shakespeare, 3 seeds, medians,
  held-back windows: 200 passes at a constant lr, the top-24-block fit −41.0% perplexity, top 6 −30.8%, the
  top-MLP fit −23.4%, backprop's 40 steps −27.0%; 10 minutes of one core, the fit with the decay −46.4%
  (−42.6% at a constant lr) against backprop's −41.5%; with the
  top MLP, the 40-pass fit + 160 MeZO passes was paired −1.0/+0.3/−1.2% against the 200-pass fit:
  an exact step is worth at least a MeZO step);
* causal LM with an output bias only (other architectures, older bundles): fit the bias first, then
  MeZO on the body with the bias held fixed (MeZO alone −0.9%, the 40-pass fit −6.6%, fit + MeZO −7.2%);
* classification: the linear-probe head (``start.py``; from 100 examples on its logits scaled by the
  cross-validated temperature: 20NG test loss 1.86 -> 0.98, ECE 0.50 -> 0.04, no prediction changed);
  on a BERT-family bundle then the head and the encoder layers' LoRA fitted from their exact gradient
  (``encoder_blocks.py``) for the whole budget, from the probe's own scale and calibrated on held-out data
  after (MiniLM, 3 seeds: RT +2.6 points at 200 passes against backprop's +1.8; 20NG +2.2 in 10 minutes
  against backprop's +1.9, +0.9 from the temperature-scaled probe; every forward-only search within noise
  of the probe), else MeZO on LoRA + head;
* prompt mode on a Llama bundle: a linear probe on the answer position's hidden state, offset by the
  zero-shot logits, then it and the LoRA on the top blocks' MLPs fitted from the exact gradient of the
  prompt's loss for the whole budget (``prompt_fit.py``), kept only if it beats the zero-shot prompt on
  held-out data (SmolLM2/Rotten Tomatoes, k = 16, docs/LEARNING.md: zero-shot 62.9%, MeZO 100 passes 64.3%,
  the probe alone 69.3%, probe + MeZO 69.7%; the fit for 10 minutes of one core 81.5% (75.7–83.6) against backprop LoRA's 80.3% (78.6–80.9));
* prompt mode, other bundles (masked LMs, older exports): the probe (kept on the same rule), then MeZO on LoRA.

MeZO stays the search because no other forward-only optimizer beat it beyond noise on any task
at the budgets measured here (docs/OPTIMIZERS.md); the lever that moved the numbers is the start.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # the search; the start (probe, output adapter) follows from the bundle (training.py)
    why: str
    # the output fit takes the whole forward-pass or time budget (keeping its best held-out point);
    # the search then gets what is left, and a --resume with a larger budget
    fit_whole_budget: bool = False


def auto_recipe(task: str, has_output_bias: bool, has_label_probe: bool = False, exact_fit: str | None = None) -> Recipe:
    """``exact_fit``: what the bundle fits from its exact gradient beyond the bias (``output_fit.fit_kind``), if anything."""
    if task == "causal-lm" and exact_fit:
        return Recipe("mezo", f"causal LM: {exact_fit} fitted from their exact gradient for the budget "
                              "(best held-out point kept), then MeZO on the body with what is left", True)
    if task == "causal-lm" and has_output_bias:
        return Recipe("mezo", "causal LM: output bias fitted from its exact gradient, then MeZO on the body")
    if task == "causal-lm":
        return Recipe("mezo", "causal LM exported without an output bias: MeZO on the body")
    if task == "classification" and exact_fit:
        return Recipe("mezo", f"classification: linear-probe head, then the {exact_fit} fitted from their exact "
                              "gradient for the budget (best held-out point kept, its head calibrated there), then MeZO "
                              "with what is left", True)
    if task == "classification":
        return Recipe("mezo", "classification: linear-probe head (temperature-scaled from 100 examples), then MeZO on LoRA + head")
    if has_label_probe and exact_fit:
        return Recipe("mezo", f"prompt mode: the {exact_fit} fitted from their exact gradient on the prompt's loss for "
                              "the budget (best held-out point kept if it beats zero-shot), then MeZO with what is left", True)
    if has_label_probe:
        return Recipe("mezo", "prompt mode: label-word probe on the answer's hidden state (kept if it beats "
                              "zero-shot on held-out data), then MeZO on LoRA")
    return Recipe("mezo", "prompt mode: MeZO from the zero-shot start")
