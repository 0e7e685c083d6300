"""Answer questions from the news index: retrieve chunks, build a grounded prompt, generate, cite the articles.

    python -m retrieval.qa "Who is the chief executive of Harbor Exchange?" --index out/index
    python -m retrieval.qa "..." --index out/index --adapter out/train/adapter     # the fine-tuned local model
    python -m retrieval.qa "..." --answerer openai:gpt-4o-mini                    # an API model through llm.py

    from retrieval.qa import QA, QAArgs
    qa = QA(QAArgs(index=Path("out/index")))
    [ans] = qa.answer(["Why did ETH fall?"])      # ans.text, ans.sources (numbered as cited), ans.cited

The excerpts are grouped by article and numbered [1], [2], ..., and the question follows them; the model is told
to answer only from the excerpts and to cite their numbers. The local model gets the prompt format it was
fine-tuned on (data.format_prompt: its chat template, or the Alpaca prompt for a base model).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cli import parse_args
from generate import GenerateArgs
from retrieval.chunk import Chunk
from retrieval.index import Index

INSTRUCTION = ("Answer the question using only the news excerpts below. Cite the excerpts you use by their "
               "number, like [1]. If the excerpts do not contain the answer, say that you do not know.")


@dataclass
class QAArgs:
    index: Path = field(default=Path("out/index"), metadata={"help": "index directory (python -m retrieval.index)"})
    answerer: str = field(default="local", metadata={
        "help": "local (checkpoint + adapter, via generate.py) or openai:MODEL (via llm.py; OPENAI_BASE_URL and "
                "OPENAI_API_KEY from the environment)"})
    checkpoint: str | None = field(default=None, metadata={"help": "local model path; none = embedded SmolLM2"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory for the local model"})
    k: int = field(default=8, metadata={"help": "chunks retrieved per question"})
    context_words: int = field(default=512, metadata={
        "help": "most words of excerpts in the prompt (bench/chunking.py measures recall at this budget)"})

    def __post_init__(self):
        if self.k < 1 or self.context_words < 1:
            raise ValueError(f"k={self.k} and context_words={self.context_words} must be >= 1")
        if self.answerer != "local" and not self.answerer.startswith("openai:"):
            raise ValueError(f"answerer={self.answerer!r} must be 'local' or 'openai:MODEL'")


@dataclass
class Source:
    n: int  # the number the prompt shows and the answer cites
    url: str
    title: str
    published: str
    score: float  # cosine similarity of the article's best chunk to the question
    excerpts: list[str]


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Source]  # every article shown to the model, in prompt order
    cited: list[int]  # source numbers the answer cites, in order of first mention
    finish_reason: str


def select_sources(hits: list[tuple[float, Chunk]], context_words: int) -> list[Source]:
    """The best chunks that fit the word budget (always at least one), grouped by article in rank order."""
    sources: dict[str, Source] = {}
    used = 0
    for score, chunk in hits:
        words = len(chunk.text.split())
        if sources and used + words > context_words:
            continue  # a smaller chunk further down may still fit
        used += words
        key = chunk.url or chunk.title or chunk.text  # chunks from the same article share one number
        if key not in sources:
            sources[key] = Source(len(sources) + 1, chunk.url, chunk.title, chunk.published, score, [])
        sources[key].excerpts.append(chunk.text)
    return list(sources.values())


def build_input(sources: list[Source]) -> str:
    """The numbered excerpts block of the prompt."""
    blocks = []
    for s in sources:
        head = f"[{s.n}] {s.title}" + (f" ({s.published[:10]})" if s.published else "")
        blocks.append(head + "\n" + "\n...\n".join(s.excerpts))
    return "\n\n".join(blocks)


def cited_numbers(text: str, n_sources: int) -> list[int]:
    """Source numbers cited as [n] (or [1, 2]) in the answer, in order of first mention, ignoring unknown ones."""
    out = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", text):
        for n in map(int, group.split(",")):
            if 1 <= n <= n_sources and n not in out:
                out.append(n)
    return out


class QA:
    """Retrieval-augmented answering over one index with a local generator or an API model."""

    def __init__(self, args: QAArgs, gen_args: GenerateArgs | None = None, index: Index | None = None,
                 generator=None, llm=None):
        self.args = args
        self.gen_args = gen_args or GenerateArgs()
        self.index = index or Index.load(args.index)
        self._generator, self._llm = generator, llm

    @property
    def generator(self):
        if self._generator is None:
            from generate import Generator
            self._generator = Generator.from_checkpoint(self.args.checkpoint, adapter=self.args.adapter)
        return self._generator

    @property
    def llm(self):
        if self._llm is None:
            from llm import LLM, LLMArgs
            self._llm = LLM(LLMArgs(model=self.args.answerer.removeprefix("openai:")))
        return self._llm

    def retrieve(self, questions: list[str]) -> list[list[Source]]:
        hits = self.index.query(questions, k=self.args.k)
        return [select_sources(h, self.args.context_words) for h in hits]

    def answer(self, questions: list[str]) -> list[Answer]:
        """Answers to all questions; the local model generates them as one batch."""
        all_sources = self.retrieve(questions)
        # the question goes last, right before the answer: small models lose a question asked before the excerpts
        instructions = [INSTRUCTION] * len(questions)
        inputs = [f"{build_input(s)}\n\nQuestion: {q}" for q, s in zip(questions, all_sources)]
        if self.args.answerer == "local":
            from data import format_prompt

            tok = self.generator.tokenizer
            prompts = [format_prompt(tok, i, x) for i, x in zip(instructions, inputs)]
            # a chat prompt carries its own special tokens; an Alpaca prompt gets BOS if the model wants it
            ids = [self.generator.encode(p, chat=tok.chat_template is not None) for p in prompts]
            results = [(r.text, r.finish_reason) for r in self.generator.generate_ids(ids, self.gen_args)]
        else:
            g = self.gen_args
            params = dict(max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                          stop=list(g.stop) or None, presence_penalty=g.presence_penalty,
                          frequency_penalty=g.frequency_penalty)
            replies = self.llm.map(lambda m: self.llm.chat(m, **params),
                                   [[{"role": "user", "content": f"{i}\n\n{x}"}] for i, x in zip(instructions, inputs)])
            results = [(c.text, c.finish_reason) for c in replies]
        return [Answer(q, text.strip(), s, cited_numbers(text, len(s)), reason)
                for q, s, (text, reason) in zip(questions, all_sources, results)]


def main(argv: list[str] | None = None) -> None:
    args, gargs, ns = parse_args(argv, QAArgs, GenerateArgs, description=__doc__,
                                 positional=[("question", {"help": "the question to answer"})])
    [ans] = QA(args, gargs).answer([ns.question])
    print(ans.text)
    print("\nSources" + (" (cited)" if ans.cited else " (retrieved; none cited)") + ":")
    for s in ans.sources:
        if not ans.cited or s.n in ans.cited:
            print(f"[{s.n}] {s.title} — {s.url}" + (f" ({s.published[:10]})" if s.published else "")
                  + f"  cos={s.score:.3f}")


if __name__ == "__main__":
    main()
