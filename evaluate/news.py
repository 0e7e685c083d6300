"""News evaluation (`python -m evaluate news`, `make evaluate`): base vs fine-tuned vs retrieval (and an API model)
on held-out news with gold labels (data/README.md): the market sentiment, main event type and coins of each article,
and two questions whose answers are verbatim in it. Every system gets the same articles and questions. Sentiment and
extraction give the model the article itself, so retrieval changes only QA: closed-book against retrieval/qa.py over
an index of --articles, the seed's "compare results from QA to fine-tuned generation".

    python -m evaluate news --adapter out/demo/adapter --out out/eval/news [--constrained]
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from annotate.schema import EVENT_TYPES, EXTRACT_SCHEMA
from data import format_prompt
from evaluate.loaders import LABELS
from evaluate.metrics import coin_counts, event_metrics, present_macro_f1, qa_scores
from evaluate.report import news_plot, news_report
from evaluate.sentiment import load_generator, predict_api, predict_local, score_predictions
from generate import GenerateArgs
from jsonl import read_jsonl, write_json, write_jsonl
from llm import LLM, LLMArgs, LLMOutputError, decoding_schema, parse_json_answer
from precision import CHOICES, choose_dtype
from retrieval.chunk import ChunkArgs
from retrieval.index import Index, IndexArgs, build_index
from retrieval.qa import QA, QAArgs
from scrape.corpus import read_articles

NEWS_SYSTEMS = ("base", "fine-tuned", "base+retrieval", "fine-tuned+retrieval", "api", "api+retrieval")
CLOSED_BOOK_INSTRUCTION = "Answer the question. If you do not know the answer, say that you do not know."


def extraction_instruction() -> str:
    return ('Read the crypto news article and reply with JSON only, in this format: '
            '{"event_type": "hack", "coins": [{"name": "Bitcoin", "ticker": "BTC"}]}. '
            f'"event_type" is the main event, one of: {", ".join(EVENT_TYPES)}. '
            '"coins" lists every cryptocurrency the article names, with its ticker.')


def extraction_schema() -> dict:
    """A valid extraction: an event type and annotate/schema.py's coin objects, or bare coin names (what models tuned
    on selfinstruct/grounding.py's records write). An unknown event type is a wrong field, not invalid JSON."""
    coin = EXTRACT_SCHEMA["properties"]["coins"]["items"]
    return {"type": "object", "required": ["event_type", "coins"],
            "properties": {"event_type": {"type": "string"},
                           "coins": {"type": "array",
                                     "items": {**coin, "type": ["object", "string"], "required": ["name"]}}}}


def extraction_decoding_schema() -> dict:
    """What constrained extraction decodes under: extraction_schema() with the event type one of annotate's and coins
    as {name, ticker} objects, no other keys (llm.decoding_schema); whatever it decodes validates against it."""
    coins = {"type": "array", "items": EXTRACT_SCHEMA["properties"]["coins"]["items"]}
    return decoding_schema({**extraction_schema(), "properties": {"event_type": {"enum": EVENT_TYPES},
                                                                  "coins": coins}})


def parse_extraction(answer: str) -> tuple[dict | None, str | None]:
    """(object, None) for the last JSON object in the answer that fits extraction_schema(), else (None, reason)."""
    try:
        return parse_json_answer(answer, extraction_schema())[0], None
    except LLMOutputError as e:
        return None, e.reason


def _labels_error(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}; see data/README.md for the labels format")


def _check_labels(rec: dict, where: str) -> None:
    if not isinstance(rec.get("url"), str):
        raise _labels_error(where, "expected a string `url`")
    if rec.get("sentiment") not in LABELS:
        raise _labels_error(where, f"sentiment={rec.get('sentiment')!r} must be one of {LABELS}")
    if rec.get("event_type") not in EVENT_TYPES:
        raise _labels_error(where, f"event_type={rec.get('event_type')!r} must be one of {EVENT_TYPES}")
    coins = rec.get("coins")
    if not isinstance(coins, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in coins):
        raise _labels_error(where, "`coins` must be a list of {name, ticker} objects")
    qa = rec.get("qa")
    if not isinstance(qa, list) or not all(isinstance(p, dict) and isinstance(p.get("question"), str)
                                           and isinstance(p.get("answer"), str) for p in qa):
        raise _labels_error(where, "`qa` must be a list of {question, answer} objects")


def load_news(articles: str | Path, labels: str | Path) -> tuple[list[dict], list[dict]]:
    """(every article, the labelled ones in labels-file order, each with its labels under "gold"), joined on url."""
    corpus = read_articles(articles)  # names a missing file or a bad line itself
    labels = Path(labels)
    if not labels.is_file():
        raise FileNotFoundError(f"no file at {labels}; pass --labels (e.g. data/sample_news_labels.jsonl)")
    by_url = {a.get("url"): a for a in corpus}
    items = []
    for n, rec in read_jsonl(labels):
        _check_labels(rec, f"{labels}:{n}")
        if rec["url"] not in by_url:
            raise ValueError(f"{labels}:{n}: url {rec['url']} is not in {articles}; label only articles it holds")
        items.append({**by_url[rec["url"]], "gold": rec})
    if not items:
        raise ValueError(f"{labels}: no labelled articles")
    return corpus, items


@dataclass
class NewsArgs:
    articles: str = field(default="data/sample_news.jsonl", metadata={
        "help": "articles JSONL; all are indexed for retrieval, the labelled ones are evaluated"})
    labels: str = field(default="data/sample_news_labels.jsonl", metadata={
        "help": "gold labels JSONL: sentiment, event_type, coins, qa per article url (data/README.md)"})
    out: str = field(default="out/eval/news", metadata={"help": "folder for report.md, news.png, "
                                                                "predictions.jsonl, metrics.json"})
    systems: tuple[str, ...] = field(default=(), metadata={
        "help": f"subset of {','.join(NEWS_SYSTEMS)}; empty = every system the other flags allow"})
    checkpoint: str | None = field(default=None, metadata={"help": "base model path; none = the embedded SmolLM2"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder of the fine-tuned systems"})
    index: str | None = field(default=None, metadata={"help": "retrieval index folder; built over --articles if "
                                                               "it holds none; none = OUT/index"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N labelled articles; 0 = all"})
    max_new_tokens: int = field(default=48, metadata={"help": "answer length limit for QA"})
    extract_tokens: int = field(default=80, metadata={"help": "answer length limit for the JSON extraction (the "
                                                              "sample's gold answers take <= 56 tokens)"})
    constrained: bool = field(default=False, metadata={
        "help": "decode the local systems' extraction JSON under its schema, event types from annotate's list "
                "(generate.py json_schema); API systems answer as usual"})
    batch_tokens: int = field(default=8192, metadata={"help": "a local model generates together as many prompts "
                                                              "as fit: rows x longest prompt <= this"})
    k: int | None = field(default=None, metadata={"help": "chunks retrieved per question; none = retrieval.qa's"})
    # retrieval.qa answers from 512 words; half keeps CPU evaluation fast and still puts the question's article in
    # the prompt for 92% of the sample's questions (97% at 512; MiniLM index, sentence chunks of 128 words)
    context_words: int = field(default=256, metadata={"help": "most words of excerpts in a retrieval prompt"})
    dtype: str = field(default="auto", metadata={
        "help": "local weights dtype; auto: bf16 where the CPU/GPU runs it natively, else fp32 (precision.py)",
        "choices": CHOICES})
    api_model: str | None = field(default=None, metadata={"help": "the api systems' OpenAI-compatible chat model, "
                                                                  "through llm.py (OPENAI_API_KEY, OPENAI_BASE_URL)"})
    base_url: str | None = field(default=None, metadata={"help": "API base URL for --api-model"})

    def __post_init__(self):
        self.systems = tuple(self.systems)
        unknown = [s for s in self.systems if s not in NEWS_SYSTEMS]
        if unknown:
            raise ValueError(f"systems={','.join(unknown)} unknown; choose from {','.join(NEWS_SYSTEMS)}")
        if any(s.startswith("fine-tuned") for s in self.systems) and not self.adapter:
            raise ValueError("systems fine-tuned and fine-tuned+retrieval need --adapter (a LoRA adapter folder)")
        if any(s.startswith("api") for s in self.systems) and not self.api_model:
            raise ValueError("systems api and api+retrieval need --api-model")
        for name in ("max_new_tokens", "extract_tokens", "batch_tokens", "k", "context_words"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.limit < 0:
            raise ValueError(f"limit={self.limit} must be >= 0")

    def selected(self) -> list[str]:
        """The systems to run, in NEWS_SYSTEMS order."""
        if self.systems:
            return [s for s in NEWS_SYSTEMS if s in self.systems]
        return [s for s in NEWS_SYSTEMS if (self.adapter or not s.startswith("fine-tuned"))
                and (self.api_model or not s.startswith("api"))]


def _article_text(item: dict) -> str:
    return f"{item['title']}\n\n{item['text']}" if item.get("title") else item["text"]


def _complete(model, api: bool, tasks: list[tuple[str, str]], max_tokens: int, batch_tokens: int,
              desc: str, json_schema: dict | None = None) -> list[str]:
    """Greedy answers to (instruction, input) pairs: from an API model through llm.py, or from a local Generator in
    the prompt format data.py trains on (decoded under json_schema when given). Local batches hold prompts of similar
    length (less padding), as many as fit batch_tokens: a decoding step of 64 rows costs ~1.5x one of 16 on CPU, so
    wide batches save most."""
    if api:
        def ask(task: tuple[str, str]) -> str:
            content = f"{task[0]}\n\n{task[1]}" if task[1] else task[0]
            return model.chat([{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0).text

        return model.map(ask, tasks, desc=desc)

    tok = model.tokenizer
    ids = [model.encode(format_prompt(tok, i, x), chat=tok.chat_template is not None) for i, x in tasks]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches, start = [], 0
    while start < len(order):
        n = 1  # sorted ascending: the row being added is the batch's longest
        while start + n < len(order) and (n + 1) * len(ids[order[start + n]]) <= batch_tokens:
            n += 1
        batches.append(order[start:start + n])
        start += n
    texts = [""] * len(ids)
    gargs = GenerateArgs(max_new_tokens=max_tokens, json_schema=json.dumps(json_schema) if json_schema else "")
    with tqdm(total=len(ids), desc=desc, unit="prompt", dynamic_ncols=True) as bar:
        for batch in batches:
            for i, result in zip(batch, model.generate_ids([ids[i] for i in batch], gargs)):
                texts[i] = result.text
            bar.update(len(batch))
    return texts


def news_sentiment(model, api: bool, items: list[dict], desc: str = "sentiment") -> tuple[dict, list[dict]]:
    """Market sentiment of each article, asked as the sentiment subcommand asks it (predict_local / predict_api)."""
    rows = [{"text": _article_text(it), "label": it["gold"]["sentiment"]} for it in items]
    texts = [r["text"] for r in rows]
    preds = predict_api(model, texts) if api else predict_local(model, texts, desc=desc)
    m, _ = score_predictions(rows, preds)
    records = [{"task": "sentiment", "url": it["url"], "gold": r["label"], **p} for it, r, p in zip(items, rows, preds)]
    return {"sentiment_accuracy": m["accuracy"], "sentiment_f1_macro": present_macro_f1(m, LABELS)}, records


def news_extraction(model, api: bool, items: list[dict], args: NewsArgs, desc: str = "extraction"
                    ) -> tuple[dict, list[dict]]:
    """JSON validity, micro F1 of the coins (summed over articles) and event-type scores of one extraction prompt."""
    tasks = [(extraction_instruction(), _article_text(it)) for it in items]
    schema = extraction_decoding_schema() if args.constrained and not api else None
    answers = _complete(model, api, tasks, args.extract_tokens, args.batch_tokens, desc, schema)
    records, counts = [], np.zeros(3, dtype=np.int64)
    for it, answer in zip(items, answers):
        obj, error = parse_extraction(answer)
        coins = obj["coins"] if obj else []
        tp_fp_fn = coin_counts(coins, it["gold"]["coins"])
        counts += tp_fp_fn
        records.append({"task": "extraction", "url": it["url"], "answer": answer, "valid": obj is not None,
                        "error": error, "event_type": obj["event_type"] if obj else None, "coins": coins,
                        "gold_event_type": it["gold"]["event_type"], "gold_coins": it["gold"]["coins"],
                        "coins_tp_fp_fn": list(tp_fp_fn)})
    tp, fp, fn = counts.tolist()
    return {"json_valid": float(np.mean([r["valid"] for r in records])),
            "coins_f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
            **event_metrics([r["gold_event_type"] for r in records], [r["event_type"] for r in records])}, records


def news_qa(model, api: bool, items: list[dict], args: NewsArgs, qa=None, desc: str = "qa") -> tuple[dict, list[dict]]:
    """Answers to every gold question: closed-book, or through retrieval.qa.QA when `qa` is given."""
    pairs = [(it, p) for it in items for p in it["gold"]["qa"]]
    questions = [p["question"] for _, p in pairs]
    if qa is None:
        tasks = [(f"{CLOSED_BOOK_INSTRUCTION}\n\nQuestion: {q}", "") for q in questions]
        answers = [(text, None) for text in _complete(model, api, tasks, args.max_new_tokens, args.batch_tokens, desc)]
    else:
        answers = []
        rows = max(1, args.batch_tokens // (2 * args.context_words))  # ~1.4 tokens a word, plus the instruction
        with tqdm(total=len(questions), desc=desc, unit="question", dynamic_ncols=True) as bar:
            for start in range(0, len(questions), rows):
                batch = qa.answer(questions[start:start + rows])
                answers += [(a.text, [s.url for s in a.sources]) for a in batch]
                bar.update(len(batch))
    records = []
    for (it, pair), (text, sources) in zip(pairs, answers):
        rec = {"task": "qa", "url": it["url"], "question": pair["question"], "reference": pair["answer"],
               "answer": text, **qa_scores(text, pair["answer"])}
        if sources is not None:
            rec.update(sources=sources, hit=it["url"] in sources)
        records.append(rec)
    metrics = {f"qa_{k}": float(np.mean([r[k] for r in records])) if records else 0.0
               for k in ("f1", "rouge_l", "contains")}
    if qa is not None:
        metrics["retrieval_hit"] = float(np.mean([r["hit"] for r in records])) if records else 0.0
    return metrics, records


def news_index(args: NewsArgs, out: Path):
    """(folder, Index): the one at --index (default OUT/index), built over --articles if the folder holds none."""
    path = Path(args.index) if args.index else out / "index"
    if (path / "index.json").is_file():
        return path, Index.load(path)
    return path, build_index(IndexArgs(articles=Path(args.articles), out=path), ChunkArgs(), progress=True)[0]


def _run_system(model, api: bool, system: str, items: list[dict], args: NewsArgs, index_path, index
                ) -> tuple[dict, list[dict]]:
    """(metrics, prediction records) of one system: every task for a bare model, QA alone for a + retrieval one."""
    t0 = time.perf_counter()
    if "+" not in system:
        parts = [news_sentiment(model, api, items, f"{system} / sentiment"),
                 news_extraction(model, api, items, args, f"{system} / extraction"),
                 news_qa(model, api, items, args, desc=f"{system} / qa")]
    else:
        qargs = QAArgs(index=index_path, answerer=f"openai:{args.api_model}" if api else "local",
                       context_words=args.context_words, **({"k": args.k} if args.k else {}))
        qa = QA(qargs, GenerateArgs(max_new_tokens=args.max_new_tokens), index=index,
                generator=None if api else model, llm=model if api else None)
        parts = [news_qa(model, api, items, args, qa, desc=f"{system} / qa")]
    metrics = {k: v for m, _ in parts for k, v in m.items()}
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return metrics, [{"system": system, **r} for _, recs in parts for r in recs]


def _open_model(stack: contextlib.ExitStack, base: str, args: NewsArgs, llm, generators: dict | None):
    """The model behind the systems named after `base`: the given or a new llm.LLM for "api", a given Generator, or
    one loaded from --checkpoint (+ --adapter for "fine-tuned")."""
    if base == "api":
        return llm or stack.enter_context(LLM(LLMArgs(model=args.api_model, base_url=args.base_url)))
    if generators and base in generators:
        return generators[base]
    return load_generator(args.checkpoint, args.adapter if base == "fine-tuned" else None, args.dtype)


def _news_setup(args: NewsArgs, items: list[dict], index_path, index) -> dict:
    """What the report says the run was."""
    return {"articles": len(items), "questions": sum(len(it["gold"]["qa"]) for it in items),
            "labels": str(args.labels), "checkpoint": args.checkpoint or "embedded SmolLM2-135M-Instruct",
            "adapter": args.adapter, "api_model": args.api_model,
            "dtype": str(choose_dtype(args.dtype, "cpu")).removeprefix("torch."),  # what auto chose
            "constrained": args.constrained,
            "index": None if index is None else f"{index_path} ({len(index)} chunks, {index.embedder_name})"}


def evaluate_news(args: NewsArgs, llm=None, generators: dict | None = None) -> dict:
    """Score every selected system on the labelled news; write report.md, news.png, predictions.jsonl and metrics.json
    into args.out. `llm` (an llm.LLM) serves the api systems instead of one built from --api-model/--base-url;
    `generators` ({"base": Generator, "fine-tuned": Generator}) replace loading --checkpoint / --adapter.
    Returns {"systems": {system: {metric: value}}, "report", "plot", "predictions", "metrics": paths}."""
    _, items = load_news(args.articles, args.labels)
    items = items[:args.limit or None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = args.selected()
    index_path = index = None
    if any(s.endswith("+retrieval") for s in systems):
        index_path, index = news_index(args, out)
    results, records = {}, []
    for base in ("base", "fine-tuned", "api"):
        todo = [s for s in systems if s.split("+")[0] == base]
        if not todo:
            continue
        with contextlib.ExitStack() as stack:  # one model in memory at a time
            model = _open_model(stack, base, args, llm, generators)
            for system in todo:
                results[system], recs = _run_system(model, base == "api", system, items, args, index_path, index)
                records += recs
            del model
    results = {s: results[s] for s in systems}  # NEWS_SYSTEMS order, not the order the models ran in
    setup = _news_setup(args, items, index_path, index)
    paths = {"report": out / "report.md", "plot": out / "news.png", "predictions": out / "predictions.jsonl",
             "metrics": out / "metrics.json"}
    write_jsonl(paths["predictions"], records, ensure_ascii=True)
    news_report(paths["report"], results, setup)
    news_plot(paths["plot"], results)
    write_json(paths["metrics"], {"setup": setup, "systems": results})
    return {"systems": results, **{k: str(v) for k, v in paths.items()}}
