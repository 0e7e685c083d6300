"""Retrieval QA: the grounded prompt a tiny local model gets, an API model through llm.py, citations, the CLI."""
from pathlib import Path

import pytest
import torch

from generate import GenerateArgs, Generator
from retrieval.chunk import Chunk, ChunkArgs
from retrieval.index import IndexArgs, build_index
from retrieval.qa import QA, QAArgs, cited_numbers, main, select_sources

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_news.jsonl"
HARBOR = "https://example.com/sample-news/01-harbor-exchange-hot-wallet-breach"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} missing")
    out = tmp_path_factory.mktemp("qa") / "index"
    # titles in the embedded text make the keyword-only hashing embedder find the right article reliably
    build_index(IndexArgs(articles=SAMPLE, out=out, embedder="hashing:1024"), ChunkArgs(chunk_title=True))
    return out


@pytest.fixture(scope="module")
def tiny_generator():
    from checkpoint import embedded_model_path, load_tokenizer
    from model import ModelArgs, Transformer

    try:
        embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tok = load_tokenizer()  # the embedded SmolLM2 tokenizer (chatml) on a tiny random model
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=2048))
    return Generator(model, tok)


class Recording:
    """Wraps a Generator and keeps the prompts it is given."""

    def __init__(self, gen):
        self.gen, self.tokenizer, self.prompts = gen, gen.tokenizer, []

    def encode(self, prompt, chat=False):
        return self.gen.encode(prompt, chat)

    def generate_ids(self, ids, args):
        self.prompts += [self.tokenizer.decode(i) for i in ids]
        return self.gen.generate_ids(ids, args)


def test_select_sources_groups_articles_within_budget():
    def chunk(url, words):
        return Chunk(" ".join(["w"] * words), url, f"T{url}", "2026-01-02T00:00:00Z", 0, 0)

    hits = [(0.9, chunk("a", 50)), (0.8, chunk("b", 40)), (0.7, chunk("a", 30)), (0.6, chunk("c", 30)),
            (0.5, chunk("d", 5))]
    sources = select_sources(hits, context_words=100)
    assert [(s.n, s.url, len(s.excerpts)) for s in sources] == [(1, "a", 1), (2, "b", 1), (3, "d", 1)]
    assert sources[0].score == 0.9
    assert [s.url for s in select_sources(hits[:1], context_words=10)] == ["a"]  # the best chunk always goes in
    assert cited_numbers("As [2] and [1, 3] say, not [9] or [x] [2].", 3) == [2, 1, 3]


def test_local_answer_is_grounded(index_dir, tiny_generator, monkeypatch):
    rec = Recording(tiny_generator)
    qa = QA(QAArgs(index=index_dir, k=4), GenerateArgs(max_new_tokens=5), generator=rec)
    questions = ["Who is the chief executive of Harbor Exchange?",
                 "Under which ticker will the Meridian Bitcoin Trust trade?"]
    answers = qa.answer(questions)
    assert [a.question for a in answers] == questions
    assert answers[0].sources[0].url == HARBOR
    assert "meridian-bitcoin" in answers[1].sources[0].url or "etf" in answers[1].sources[0].url
    for a, prompt in zip(answers, rec.prompts):
        assert a.finish_reason in ("stop", "length") and isinstance(a.text, str)
        assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
        assert a.question in prompt and f"[1] {a.sources[0].title}" in prompt
        assert a.sources[0].excerpts[0] in prompt
    # a base model (no chat template) gets the Alpaca prompt it was fine-tuned with
    monkeypatch.setattr(tiny_generator.tokenizer, "chat_template", None)
    qa.answer(questions[:1])
    assert "### Instruction:" in rec.prompts[-1] and "### Input:" in rec.prompts[-1]


def _api_qa(index_dir, reply_text, monkeypatch):
    from llm import LLM, LLMArgs
    from tests.fakeopenai import FakeOpenAI, chat_response

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    server = FakeOpenAI(lambda path, body: (200, {}, chat_response(reply_text)))
    return server, lambda s: QA(QAArgs(index=index_dir, answerer="openai:gpt-test"), GenerateArgs(max_new_tokens=40),
                                llm=LLM(LLMArgs(model="gpt-test", base_url=s.base_url, cache=None)))


def test_api_answer_cites_sources(index_dir, monkeypatch):
    server, make = _api_qa(index_dir, "Mara Quist runs it [1].", monkeypatch)
    with server:
        [ans] = make(server).answer(["Who is the chief executive of Harbor Exchange?"])
        body = server.requests[0]["body"]
    assert ans.text == "Mara Quist runs it [1]." and ans.cited == [1] and ans.sources[0].url == HARBOR
    assert body["model"] == "gpt-test" and body["max_tokens"] == 40
    content = body["messages"][0]["content"]
    assert "Question: Who is the chief executive" in content and "[1] Harbor Exchange halts" in content


def test_cli(index_dir, monkeypatch, tmp_path, capsys):
    from tests.fakeopenai import FakeOpenAI, chat_response

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)  # llm.py's answer cache lands here
    with FakeOpenAI(lambda path, body: (200, {}, chat_response("About $41 million [1]."))) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        main(["How much did attackers drain from Harbor Exchange's hot wallet?", "--index", str(index_dir),
              "--answerer", "openai:gpt-test"])
    out = capsys.readouterr().out
    assert out.startswith("About $41 million [1].") and "Sources (cited):" in out and HARBOR in out
    with pytest.raises(SystemExit):
        main(["q", "--answerer", "gpt-4"])
