import random

from rouge_score import rouge_scorer

from fedpit.textmetrics import max_rouge_l, rouge_l

WORDS = "fever cough pain the a of in heart lung liver rest water doctor test".split()


def test_rouge_l_matches_rouge_score_package():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    for _ in range(200):
        a = " ".join(rng.choices(WORDS, k=rng.randint(0, 20)))
        b = " ".join(rng.choices(WORDS, k=rng.randint(0, 20)))
        assert abs(rouge_l(a, b) - scorer.score(a, b)["rougeL"].fmeasure) < 1e-9


def test_rouge_l_matches_rouge_score_package_on_long_texts():
    """Responses run to hundreds of words: longer than one machine word of the bit-parallel LCS."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(2)
    for _ in range(30):
        a = " ".join(rng.choices(WORDS, k=rng.randint(60, 300)))
        b = " ".join(rng.choices(WORDS, k=rng.randint(60, 300)))
        assert abs(rouge_l(a, b) - scorer.score(a, b)["rougeL"].fmeasure) < 1e-9


def test_max_rouge_l_is_exact_despite_pruning():
    rng = random.Random(1)
    refs = [" ".join(rng.choices(WORDS, k=15)) for _ in range(30)]
    for _ in range(20):
        pred = " ".join(rng.choices(WORDS, k=12))
        assert abs(max_rouge_l(pred, refs) - max(rouge_l(r, pred) for r in refs)) < 1e-12
    assert max_rouge_l("anything", []) == 0.0
