"""bench/extract.py's cross-validation: folds by site, each fold scored with weights fitted without it, and the
real crypto pages scored beside the benchmark (never tuned on)."""
import pytest

from bench import extract as bench
from scrape.extract import WEIGHTS, Weights, extract_article, prepare_page


@pytest.fixture(scope="module")
def few_pages():
    from tests.conftest import SHARED_DATA

    data = SHARED_DATA / "article-extraction-benchmark"
    if not data.is_dir():
        pytest.skip(f"real data not found at {data}")
    return bench.load(data)[:24]


def test_folds_keep_a_site_together_and_are_deterministic():
    pages = [("", f"https://{host}/a{i}", "") for i, host in enumerate(["a.example", "www.a.example", "b.example",
                                                                       "c.example", "d.example", "b.example"])]
    folds = bench.site_folds(pages, 3, seed=1)
    assert folds == bench.site_folds(pages, 3, seed=1) and set(folds) == {0, 1, 2}
    assert folds[0] == folds[1] and folds[2] == folds[5]  # www. is the same site


def test_prepared_text_is_the_generic_path(few_pages):
    other = Weights(good_min=80, link_w=3.0, bad_w=1.0, bad_c=5.0, desc_r=0.95)
    for html, url, _ in few_pages[:8]:
        prepared = prepare_page(html, url)
        for w in (WEIGHTS, other):
            assert prepared.text(w) == extract_article(html, url, use_jsonld_body=False, w=w)["text"]


def test_each_fold_is_scored_with_weights_fitted_without_it(few_pages, monkeypatch):
    useless = Weights(good_min=10 ** 6)  # no block is article-like: extracts nothing
    seen = []
    real_fit = bench.Tuner.fit
    monkeypatch.setattr(bench.Tuner, "fit", lambda self, rows: seen.append(list(rows)) or real_fit(self, rows))
    cv = bench.cross_validate(few_pages, 3, candidates=[useless, WEIGHTS])
    assert cv["fitted"] == [WEIGHTS] * 3 and cv["all_pages"] == WEIGHTS
    assert cv["oof"] == cv["in_sample"]
    for f, rows in enumerate(seen[:3]):
        assert rows and not any(cv["folds"][i] == f for i in rows)
    assert seen[3] == list(range(len(few_pages)))
    assert bench.scores(cv["oof"])["f1"] > 0.8


def test_grid_starts_with_the_shipped_weights():
    candidates = bench.grid()
    assert candidates[0] == WEIGHTS and len(set(candidates)) == len(candidates)
    assert len(candidates) == 3 ** 5


def test_crypto_pages_are_scored(shared_data):
    pages = bench.crypto_pages(shared_data / "crypto-news" / "pages")
    assert {p["name"] for p in pages} == set(bench.CRYPTO_SOURCES)
    result = bench.score_crypto(pages, references=False)
    for per_page in result.values():
        for r in per_page.values():
            assert r["with"] == r["of_with"] and r["without"] == r["of_without"] and r["f1"] > 0.85
