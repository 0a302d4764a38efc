"""The embedded example app learns from corrections (runtime only)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from learn_from_corrections import CorrectionLearner  # noqa: E402

from edgeft.runtime import Bundle  # noqa: E402
from tests.models import SENTIMENT  # noqa: E402


def test_corrections_are_learned(bert_bundle):
    learner = CorrectionLearner(Bundle(bert_bundle), steps_per_correction=3)
    for text, label in SENTIMENT:
        learner.correct(text, label)
    correct = sum(learner.predict(text)[0] == label for text, label in SENTIMENT)
    assert correct >= 10, f"{correct}/12 of its own corrections"
