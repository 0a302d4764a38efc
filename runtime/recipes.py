"""``--optimizer auto``: the recipe a run uses when the user names none, chosen per task and bundle.

The rule follows what was measured here (README "Choosing a recipe", docs/LEARNING.md):

* causal LM with an output bias: fit the bias from its exact gradient first (research.md: −8.7%
  perplexity on SmolLM2/Shakespeare where every zeroth-order optimizer at 160 passes reached −1.4%
  at best), then MeZO on the body with the bias held fixed;
* classification: the linear-probe head (``start.py``), then MeZO on LoRA + head;
* prompt mode: a linear probe on the answer position's hidden state, offset by the zero-shot logits
  (kept only if it beats the zero-shot prompt on held-out data), then MeZO on LoRA (the demo: +8.6
  points in 150 MeZO steps from the zero-shot start).

MeZO stays the search because no other forward-only optimizer beat it beyond noise on any task
at the budgets measured here (docs/OPTIMIZERS.md); the lever that moved the numbers is the start.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    optimizer: str
    fit_output_bias: bool
    why: str


def auto_recipe(task: str, has_output_bias: bool, has_label_probe: bool = False) -> Recipe:
    if task == "causal-lm" and has_output_bias:
        return Recipe("mezo", True, "causal LM: output bias fitted from its exact gradient, then MeZO on the body")
    if task == "causal-lm":
        return Recipe("mezo", False, "causal LM exported without an output bias: MeZO on the body")
    if task == "classification":
        return Recipe("mezo", False, "classification: linear-probe head, then MeZO on LoRA + head")
    if has_label_probe:
        return Recipe("mezo", False, "prompt mode: label-word probe on the answer's hidden state (kept if it beats "
                                     "zero-shot on held-out data), then MeZO on LoRA")
    return Recipe("mezo", False, "prompt mode: MeZO from the zero-shot start")
