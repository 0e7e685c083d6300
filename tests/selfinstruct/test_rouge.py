"""selfinstruct/rouge.py against rouge-score (the reference) and rouge-score-rs, on real and random texts."""
import json
import random

import numpy as np
import pytest
from rouge_score import rouge_scorer

from selfinstruct.rouge import RougeFilter, _lcs_pair, _lcs_rows, _pad, duplicate_key, rouge_l, rouge_l_batch, tokenize
from tests.conftest import SHARED_DATA

SCORER = rouge_scorer.RougeScorer(["rougeL"])
EDGE = ["", "   ", "?!.,;", "$$$ €€€", "the", "the the the the", "the cat the cat the", "The CAT sat.",
        "Café naïve résumé", "比特币价格上涨", "比特币价格上涨 BTC",
        "\u212a (Kelvin sign) lowercases to k",
        "snake_case and camelCase", "tabs\tand\nnewlines\r\nmixed", "$5 BTC at 3.5%", "5 btc at 3 5",
        " ".join(["a", "b"] * 40), " ".join(f"w{i % 7}" for i in range(65)), " ".join(f"w{i}" for i in range(64)),
        " ".join(f"w{i % 13}" for i in range(129)), " ".join(f"w{i % 5}" for i in range(200))]


def reference(ref: str, cand: str) -> float:
    return SCORER.score(ref, cand)["rougeL"].fmeasure


@pytest.fixture(scope="module")
def pool():
    path = SHARED_DATA / "selfinstruct" / "rouge_pool.json"
    if not path.is_file():
        pytest.skip(f"real data not found at {path}")
    return json.loads(path.read_text())


def test_tokenize_matches_rouge_score():
    from rouge_score.tokenize import tokenize as ref_tokenize
    for text in EDGE:
        assert tokenize(text) == ref_tokenize(text, None)


def test_edge_cases_match_rouge_score():
    for a in EDGE:
        for b in EDGE:
            assert rouge_l(a, b) == reference(a, b), (a, b)
        np.testing.assert_array_equal(rouge_l_batch(a, EDGE), [reference(p, a) for p in EDGE])


def test_random_token_sequences_lcs():
    """Bit-parallel LCS (Python ints and numpy rows, 1 to 4 words) against rouge-score's DP table."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        cand = rng.integers(0, rng.integers(1, 12), rng.integers(1, 200))
        rows = [rng.integers(0, 12, rng.integers(0, 150)) for _ in range(8)]
        got = _lcs_rows(cand, _pad(rows))
        for r, row in enumerate(rows):
            want = rouge_scorer._lcs_table(row.tolist(), cand.tolist())[-1][-1]
            assert got[r] == want == _lcs_pair(cand.tolist(), row.tolist())


def test_20000_real_pairs_match_rouge_score(pool):
    rng = random.Random(0)
    pairs = [(rng.choice(pool), rng.choice(pool)) for _ in range(15000)]
    # near-duplicates too, so high scores are covered, not just the ~0.1 of unrelated texts
    for _ in range(5000):
        a = rng.choice(pool).split()
        b = [w for w in a if rng.random() > 0.2]
        pairs.append((" ".join(a), " ".join(b)))
    got = np.array([rouge_l(a, b) for a, b in pairs])
    want = np.array([reference(a, b) for a, b in pairs])
    assert np.abs(got - want).max() <= 1e-12
    assert (got == want).all()  # same float operations in the same order: bit-identical
    assert (want > 0.7).sum() > 1000


def test_batch_matches_rouge_score_on_real_pool(pool):
    long = [t for t in pool if len(tokenize(t)) > 64]
    for cand in pool[:3] + long[:2] + [long[0][: len(long[0]) // 2]]:
        refs = pool[:300] + long[:30]
        np.testing.assert_array_equal(rouge_l_batch(cand, refs), [reference(r, cand) for r in refs])


def reference_filter(texts, threshold=0.7):
    """The Self-Instruct filter written with rouge-score."""
    kept = []
    for t in texts:
        if not any(reference(t, k) > threshold for k in kept):
            kept.append(t)
    return kept


def test_filter_keeps_what_rouge_score_keeps(pool):
    rng = random.Random(1)
    texts = []
    for t in pool[:100]:  # each real text, then sometimes a perturbed copy: many decisions near 0.7
        texts.append(t)
        if rng.random() < 0.5:
            words = t.split()
            texts.append(" ".join(w for w in words if rng.random() > 0.25) or t)
    filt = RougeFilter(0.7)
    ours = [t for t in texts if filt.add_if_novel(t)]
    want = reference_filter(texts)
    assert ours == want and filt.kept == want
    assert 0 < len(texts) - len(want)


def test_filter_threshold_ties_and_thresholds():
    # 10 vs 10 tokens with an LCS of 7: F = 0.7 exactly in rationals; the decision must follow rouge-score's floats
    ref = " ".join(f"t{i}" for i in range(10))
    texts = [ref] + [" ".join([f"t{i}" for i in range(7)] + [f"x{k}{j}" for j in range(3)]) for k in range(3)]
    texts += [" ".join([f"t{i}" for i in range(k)] + ["y"] * (10 - k)) for k in range(10)]
    for thr in (0.0, 0.3, 0.5, 0.7, 0.75, 0.9, 1.0):
        filt = RougeFilter(thr)
        assert [t for t in texts if filt.add_if_novel(t)] == reference_filter(texts, thr), thr


def test_filter_exact_duplicates_beyond_rouge():
    """rouge-score gives 0 for texts without [a-z0-9]; the normalised exact-duplicate check still catches them."""
    a, b = "比特币价格今天上涨了百分之五", "比特币价格今天上涨了百分之五。"
    assert rouge_l(a, b) == reference(a, b) == 0.0
    assert duplicate_key(a) == duplicate_key(b)
    filt = RougeFilter()
    assert filt.add_if_novel(a)
    assert filt.reject_reason(b) == "duplicate" and not filt.add_if_novel(b)
    assert filt.reject_reason("Summarise the news for a trader.") is None
    assert filt.add_if_novel("Summarise the news for a trader.")
    assert filt.reject_reason("SUMMARISE the news for a trader!") == "duplicate"
    assert filt.reject_reason("Summarise the crypto news for a trader.") == "rouge"
    with pytest.raises(ValueError, match="threshold"):
        RougeFilter(1.5)


@pytest.mark.reference
def test_filter_on_real_pool_matches_rouge_score_rs(pool):
    """1,000 real texts: the kept list equals the Rust implementation's (which is itself rouge-score-exact);
    bench/rouge.py checks all 3,121."""
    import rouge_score_rs
    pool = pool[:1000]
    rs = rouge_score_rs.RougeScorer(["rougeL"])
    filt = RougeFilter(0.7)
    ours = [t for t in pool if filt.add_if_novel(t)]
    want = []
    for t in pool:
        if not want or rs.score_multi(want, t)["rougeL"].fmeasure <= 0.7:
            want.append(t)
    assert ours == want
