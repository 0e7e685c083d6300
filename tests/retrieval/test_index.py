"""The numpy index vs faiss IndexFlatIP; save/load; incremental, deduplicating adds; the build CLI."""
import json

import numpy as np
import pytest

from retrieval.chunk import Chunk, ChunkArgs
from retrieval.embed import HashingEmbedder
from retrieval.index import Index, build_index, IndexArgs, main, topk_rows


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _chunks(texts, url="u"):
    return [Chunk(text=t, url=f"{url}{i}", title=f"T{i}", published="2026-11-25", start=0, end=len(t))
            for i, t in enumerate(texts)]


class CountingEmbedder(HashingEmbedder):
    """Hashing embedder that records every text it is asked to embed."""

    def __init__(self):
        super().__init__(256)
        self.seen = []

    def encode(self, texts, batch_size=0):
        self.seen += texts
        return super().encode(texts)


@pytest.mark.reference
@pytest.mark.parametrize("nq,k,block_elems", [(1, 10, 1 << 22), (1, 7, 1000), (37, 10, 1 << 16), (5, 100, 1000)])
def test_search_matches_faiss(nq, k, block_elems):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(nq)
    n, d = 5000, 48
    vectors, queries = _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((nq, d)))
    index = Index(HashingEmbedder(d))
    index.add_vectors(vectors, _chunks(["x"] * n))
    scores, ids = index.search(queries, k, block_elems=block_elems)  # 1000 elems -> 1024-row blocks
    flat = faiss.IndexFlatIP(d)
    flat.add(vectors)
    ref_scores, ref_ids = flat.search(queries, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.reference
def test_float16_index_matches_faiss_on_rounded_vectors():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    vectors, queries = _unit(rng.standard_normal((3000, 32))), _unit(rng.standard_normal((4, 32)))
    index = Index(HashingEmbedder(32), dtype="float16")
    index.add_vectors(vectors, _chunks(["x"] * 3000))
    assert index.vectors.dtype == np.float16
    flat = faiss.IndexFlatIP(32)
    flat.add(index.vectors.astype(np.float32))
    scores, ids = index.search(queries, 5, block_elems=1)
    ref_scores, ref_ids = flat.search(queries, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_k_beyond_size_returns_everything_sorted():
    index = Index(HashingEmbedder(16))
    index.add_vectors(np.random.default_rng(0).standard_normal((7, 16)), _chunks(["x"] * 7))
    scores, ids = index.search(np.ones((2, 16)), k=50)
    assert scores.shape == (2, 7) and sorted(ids[0]) == list(range(7))
    assert (np.diff(scores, axis=1) <= 0).all()
    assert Index(HashingEmbedder(16)).search(np.ones(16), 3)[1].shape == (1, 0)


def test_topk_rows_orders_ties_by_id():
    scores = np.array([[0.5, 0.75, 0.5, 0.125, 0.75]], np.float32)
    top, ids = topk_rows(scores, 2)
    assert ids.tolist() == [[1, 4]] and top.tolist() == [[0.75, 0.75]]
    assert topk_rows(scores, 9)[1].tolist() == [[1, 4, 0, 2, 3]]


def test_add_is_incremental_and_dedups():
    emb = CountingEmbedder()
    index = Index(emb, ChunkArgs(chunk_title=False))
    assert index.add(_chunks(["bitcoin rallies", "ether falls", "bitcoin rallies"])) == 2  # duplicate in batch
    assert emb.seen == ["bitcoin rallies", "ether falls"]
    before = index.vectors.copy()
    assert index.add(_chunks(["ether falls", "solana halts", "doge pumps"], url="v")) == 2
    assert emb.seen[2:] == ["solana halts", "doge pumps"]  # what was there is not embedded again
    np.testing.assert_array_equal(index.vectors[:2], before)
    assert len(index) == 4 and index.vectors.shape == (4, 256)
    hits = index.query(["solana halts"], k=2)[0]
    assert hits[0][1].text == "solana halts" and hits[0][0] == pytest.approx(1.0, abs=1e-6)
    assert index.add([]) == 0


def test_title_is_embedded_but_not_stored():
    emb = CountingEmbedder()
    index = Index(emb, ChunkArgs(chunk_title=True))
    index.add(_chunks(["price up"]))
    assert emb.seen == ["T0\nprice up"] and index.chunks[0].text == "price up"


def test_save_load_round_trip(tmp_path):
    index = Index(HashingEmbedder(64), ChunkArgs(chunker="tokens", chunk_size=50, chunk_overlap=10), "float16")
    index.add(_chunks(["alpha beta", "gamma delta", "epsilon zeta ünïcode"]))
    index.save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["chunks.jsonl", "embeddings.npy", "index.json"]
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta == {"format": 1, "embedder": "hashing:64", "dim": 64, "dtype": "float16", "count": 3,
                    "chunker": {"chunker": "tokens", "chunk_size": 50, "chunk_overlap": 10, "chunk_title": False}}
    for mmap in (False, True):
        loaded = Index.load(tmp_path / "ix", mmap=mmap)
        assert loaded.chunks == index.chunks and loaded.chunk_args == index.chunk_args
        assert loaded.vectors.dtype == np.float16
        np.testing.assert_array_equal(loaded.vectors, index.vectors)
        assert loaded.embedder.name == "hashing:64"  # rebuilt from the recorded name
        assert [c.text for _, c in loaded.query(["gamma delta"], k=1)[0]] == ["gamma delta"]
        assert loaded.add(_chunks(["alpha beta"])) == 0  # dedup state survives the round trip
    with pytest.raises(FileNotFoundError, match="retrieval.index"):
        Index.load(tmp_path / "missing")
    (tmp_path / "ix" / "chunks.jsonl").write_text("")
    with pytest.raises(ValueError, match="rebuild"):
        Index.load(tmp_path / "ix")


def _write_articles(path, n, start=0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            text = f"Article {i} says coin {i} moved. " * 30 + f"\n\nA second paragraph about token {i}."
            f.write(json.dumps({"url": f"https://news.example/{i}", "title": f"Coin {i}",
                                "published": "2026-11-25", "text": text}) + "\n")


def test_cli_builds_then_adds_only_new_articles(tmp_path, capsys):
    arts, out = tmp_path / "articles.jsonl", tmp_path / "index"
    flags = ["--articles", str(arts), "--out", str(out), "--embedder", "hashing:128", "--chunk-size", "40",
             "--chunk-overlap", "8"]
    _write_articles(arts, 3)
    main(flags)
    first = Index.load(out)
    assert first.urls == {f"https://news.example/{i}" for i in range(3)}
    assert all(c.title == f"Coin {c.url.rsplit('/', 1)[1]}" for c in first.chunks)
    _write_articles(arts, 5)  # the 3 old articles again plus 2 new ones
    main(flags)
    assert "+2 articles" in capsys.readouterr().out
    second = Index.load(out)
    assert second.chunks[:len(first)] == first.chunks
    np.testing.assert_array_equal(second.vectors[:len(first)], first.vectors)
    assert len(second.urls) == 5
    with pytest.raises(ValueError, match="pass the same settings"):
        build_index(IndexArgs(articles=arts, out=out, embedder="hashing:64"), ChunkArgs(chunk_size=40, chunk_overlap=8))


def test_cli_rejects_bad_input(tmp_path):
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"url": "x", "text": "ok"}\n{"url": "y"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: .*'text'"):  # scrape.corpus.read_articles' check
        build_index(IndexArgs(articles=bad, out=tmp_path / "ix"), ChunkArgs())
    with pytest.raises(SystemExit):
        main(["--articles", str(tmp_path / "nope.jsonl")])


def test_load_names_the_broken_file_and_key(tmp_path):
    index = Index(HashingEmbedder(16))
    index.add(_chunks(["alpha beta", "gamma delta"]))
    ix = index.save(tmp_path / "ix")
    meta = json.loads((ix / "index.json").read_text())
    (ix / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"index.json: not valid JSON"):
        Index.load(ix)
    (ix / "index.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "chunker"}))
    with pytest.raises(ValueError, match=r"index.json: key 'chunker' missing"):
        Index.load(ix)
    (ix / "index.json").write_text(json.dumps(meta | {"chunker": {"chunk_size": "big", "nope": 1}}))
    with pytest.raises(ValueError, match=r"index.json: bad embedder/chunker/dtype"):
        Index.load(ix)
    (ix / "index.json").write_text(json.dumps(meta))
    lines = (ix / "chunks.jsonl").read_text().splitlines()
    (ix / "chunks.jsonl").write_text(lines[0] + "\n" + '{"text": "no url"}\n')
    with pytest.raises(ValueError, match=r"chunks.jsonl:2: not a chunk"):
        Index.load(ix)
    (ix / "chunks.jsonl").write_text("\n".join(lines) + "\n")
    (ix / "embeddings.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(ValueError, match=r"embeddings.npy: unreadable"):
        Index.load(ix)
