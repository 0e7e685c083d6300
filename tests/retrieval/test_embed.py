"""Our plain-PyTorch MiniLM vs transformers' BertModel + mean pooling; the hashing and API embedders."""
import json
import shutil

import numpy as np
import pytest
import torch

from retrieval.embed import BertEmbedder, OpenAIEmbedder, load_embedder


def _reference_embed(model_dir, texts, max_len=256):
    """sentence-transformers' recipe with the reference libraries: BertModel, masked mean, L2 norm."""
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = BertModel.from_pretrained(str(model_dir)).eval()
    pooled, ids = [], []
    for i in range(0, len(texts), 50):  # the caller sorts by length, so little padding
        batch = tok(texts[i:i + 50], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append(torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))
        ids += [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return torch.cat(pooled).numpy(), ids


def _real_sentences(shared_data, n=200):
    fpb = (shared_data / "crypto-news" / "financial_phrasebank" / "Sentences_AllAgree.txt").read_text("utf-8")
    news = [line.rsplit("@", 1)[0] for line in fpb.splitlines() if "@" in line][:n // 2]
    seeds = [json.loads(line)["instruction"]
             for line in (shared_data / "selfinstruct" / "seed_tasks.jsonl").read_text().splitlines()]
    bodies = json.loads((shared_data / "article-extraction-benchmark" / "ground-truth.json").read_text())
    # a few whole articles run past the 256-piece window and exercise truncation
    long = [v["articleBody"] for v in list(bodies.values())[:2]]
    return sorted(news + seeds[:n - len(news) - len(long)] + long, key=len)


@pytest.mark.reference
def test_minilm_matches_transformers_on_real_text(shared_data, minilm_dir):
    texts = _real_sentences(shared_data)
    assert len(texts) == 200
    ours = BertEmbedder(minilm_dir, name="minilm")
    assert ours.max_len == 256  # sentence_bert_config.json, not tokenizer.json's 128
    ref, ref_ids = _reference_embed(minilm_dir, texts)
    assert ours.token_ids(texts) == ref_ids
    assert max(len(i) for i in ref_ids) == 256
    got = ours.encode(texts, batch_size=32)
    assert got.dtype == np.float32 and got.shape == (200, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * ref).sum(1)
    assert cos.min() >= 0.9999, cos.min()
    # batching and length sorting must not change a row
    np.testing.assert_allclose(ours.encode(texts[-5:], batch_size=2), got[-5:], atol=1e-5)


@pytest.mark.reference
def test_random_bert_matches_transformers(tmp_path, minilm_dir):
    """A tiny randomly initialised BERT saved by transformers loads into ours and agrees, padding included."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(minilm_dir / "tokenizer.json", tmp_path)
    ours = BertEmbedder(tmp_path)
    assert ours.max_len == 64 and ours.dim == 48
    ref = BertModel.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(1000, 30000, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:], mask[2, 5:] = 0, 0
    with torch.inference_mode():
        hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        want = (hidden * m).sum(1) / m.sum(1)
        got = ours.model(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bert_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertEmbedder(tmp_path)
    with pytest.raises(ValueError, match="unknown"):
        load_embedder("word2vec")


def test_hashing_embedder():
    emb = load_embedder("hashing:512")
    assert (emb.name, emb.dim) == ("hashing:512", 512)
    texts = ["Bitcoin price jumps as ETF inflows surge", "ETF inflows surge, bitcoin price jumps",
             "The central bank kept interest rates unchanged", ""]
    v = emb.encode(texts)
    assert v.shape == (4, 512) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-6)
    assert not v[3].any()  # nothing to hash: a zero row, which scores 0 against everything
    sims = v[:3] @ v[:3].T
    assert sims[0, 1] > 0.5 > sims[0, 2]
    # crc32 buckets: the same vector in every process, which is what a saved index relies on
    assert load_embedder(emb.name).encode(texts[:1]).tobytes() == v[:1].tobytes()


def test_openai_embedder_through_llm(monkeypatch):
    from llm import LLM, LLMArgs
    from tests.fakeopenai import FakeOpenAI, embedding_response

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")

    def respond(path, body):
        assert path == "/v1/embeddings" and body["model"] == "text-embedding-3-small"
        return 200, {}, embedding_response([[3.0, 4.0, 0.0] for _ in body["input"]])

    with FakeOpenAI(respond) as server:
        emb = OpenAIEmbedder(llm=LLM(LLMArgs(base_url=server.base_url, cache=None)))
        v = emb.encode(["a", "b"])
    assert emb.name == "openai:text-embedding-3-small" and emb.dim == 3
    np.testing.assert_allclose(v, [[0.6, 0.8, 0.0]] * 2, atol=1e-6)


def test_bert_config_errors_name_file_and_key(tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        BertEmbedder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config.json: lacks 'vocab_size'"):
        BertEmbedder(tmp_path)
