import random

import pytest
from rouge_score import rouge_scorer

from fedpit.textmetrics import max_rouge_l, rouge_l

WORDS = "fever cough pain the a of in heart lung liver rest water doctor test".split()


@pytest.mark.parametrize("lengths, pairs", [
    ((0, 20), 200),
    ((60, 300), 30),  # responses run to hundreds of words: longer than one machine word of the bit-parallel LCS
])
def test_rouge_l_matches_rouge_score_package(lengths, pairs):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(lengths[1])
    for _ in range(pairs):
        a = " ".join(rng.choices(WORDS, k=rng.randint(*lengths)))
        b = " ".join(rng.choices(WORDS, k=rng.randint(*lengths)))
        assert abs(rouge_l(a, b) - scorer.score(a, b)["rougeL"].fmeasure) < 1e-9


def test_max_rouge_l_is_the_maximum_and_stops_at_the_threshold():
    rng = random.Random(1)
    refs = [" ".join(rng.choices(WORDS, k=15)) for _ in range(30)]
    for _ in range(20):
        pred = " ".join(rng.choices(WORDS, k=12))
        assert abs(max_rouge_l(pred, refs) - max(rouge_l(r, pred) for r in refs)) < 1e-12
    assert max_rouge_l("anything", []) == 0.0
    refs = ["fever cough pain", "fever cough pain heart"]  # ROUGE-L 0.857 then 1.0 against the second
    assert max_rouge_l("fever cough pain heart", refs) == 1.0
    assert abs(max_rouge_l("fever cough pain heart", refs, threshold=0.5) - 6 / 7) < 1e-12, "stops at the first"
