"""A numpy cosine-similarity index over article chunks, and the CLI that builds it from articles.jsonl.

    python -m retrieval.index --articles out/articles.jsonl --out out/index
    python -m retrieval.index --articles more.jsonl --out out/index   # adds only articles not indexed yet
    python -m retrieval.index --articles out/articles.jsonl --out out/index-fast --embedder hashing

    from retrieval.index import Index
    index = Index.load("out/index")
    hits = index.query(["Why did bitcoin drop?"], k=5)[0]   # [(score, Chunk), ...] best first

On disk (written atomically): `embeddings.npy` (unit rows), `chunks.jsonl` (one chunk a line, same order) and
`index.json` (embedder name, dims, dtype, chunker settings, count).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from cli import parse_args
from jsonl import atomic_write, read_jsonl, write_json, write_jsonl
from retrieval.chunk import Chunk, ChunkArgs, chunk_article
from scrape.corpus import read_articles

FORMAT = 1


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def topk_rows(scores: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest scores, descending, and their ids (column numbers if None). Equal scores are listed
    by smaller id; which of several equal scores at the k-th place makes the cut is up to argpartition."""
    m = scores.shape[1]
    if k < m:
        part = np.argpartition(scores, m - k, axis=1)[:, m - k:]  # O(m) selection, unordered
        top = np.take_along_axis(scores, part, axis=1)
        ids = part if ids is None else np.take_along_axis(ids, part, axis=1)
    else:
        top, ids = scores, np.broadcast_to(np.arange(m), scores.shape) if ids is None else ids
    order = np.lexsort((ids, -top), axis=1)  # sort only the k survivors
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(ids, order, axis=1)


class Index:
    """Unit-norm chunk vectors in one matrix; search = inner product = cosine similarity."""

    def __init__(self, embedder="minilm", chunk_args: ChunkArgs | None = None, dtype: str = "float32"):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype={dtype!r} must be float32 or float16")
        # a name is loaded on first use, so loading an index to inspect it needs no model
        self._embedder = None if isinstance(embedder, str) else embedder
        self.embedder_name = embedder if isinstance(embedder, str) else embedder.name
        self.chunk_args = chunk_args or ChunkArgs()
        self.dtype = np.dtype(dtype)
        self.vectors = np.zeros((0, 0), self.dtype)
        self.chunks: list[Chunk] = []
        self._hashes: set[str] = set()

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def embedder(self):
        if self._embedder is None:
            from retrieval.embed import load_embedder  # lazy: torch and a model only when embedding
            self._embedder = load_embedder(self.embedder_name)
        return self._embedder

    @property
    def urls(self) -> set[str]:
        return {c.url for c in self.chunks}

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.embedder.encode(texts, batch_size=batch_size)

    def add(self, chunks: list[Chunk], batch_size: int = 64, progress: bool = False) -> int:
        """Embed and append the chunks whose text is not in the index yet; returns how many were added."""
        new, seen = [], set()
        for c in chunks:
            h = _text_hash(c.text)
            if h not in self._hashes and h not in seen:
                seen.add(h)
                new.append(c)
        if not new:
            return 0
        texts = [c.embed_text(self.chunk_args.chunk_title) for c in new]
        step = batch_size * 8  # encode in slices so the bar moves; the embedder sorts by length inside each
        parts = []
        with tqdm(total=len(texts), desc="embed", unit="chunk", disable=not progress) as bar:
            for i in range(0, len(texts), step):
                parts.append(self.embed(texts[i:i + step], batch_size))
                bar.update(len(parts[-1]))
        self.add_vectors(np.concatenate(parts), new)
        return len(new)

    def add_vectors(self, vectors: np.ndarray, chunks: list[Chunk]) -> None:
        """Append precomputed vectors (rows are normalised here) for `chunks`; no deduplication."""
        if len(vectors) != len(chunks):
            raise ValueError(f"{len(vectors)} vectors for {len(chunks)} chunks")
        v = np.asarray(vectors, dtype=np.float32)
        v = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(self.dtype)
        if len(self.chunks) and v.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"vectors have {v.shape[1]} dims, the index {self.vectors.shape[1]}: "
                             f"was it built with another embedder than {self.embedder_name}?")
        self.vectors = np.concatenate([self.vectors, v]) if len(self.chunks) else v
        self.chunks += chunks
        self._hashes.update(_text_hash(c.text) for c in chunks)

    def search(self, queries: np.ndarray, k: int = 10, block_elems: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products of each query row against the index: (scores, ids), each (n_queries, k).

        One query is a GEMV plus an O(n) argpartition. Many queries run as a GEMM over blocks of index rows
        sized so that one block's score matrix (`block_elems` floats) stays in cache while its top-k is selected;
        each block keeps only k candidates per query, and the candidates are merged at the end."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        n = len(self.chunks)
        k = min(k, n)
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if q.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries have {q.shape[1]} dims, the index {self.vectors.shape[1]}")
        rows = min(max(block_elems // len(q), 1024), 1 << 16)  # 64k rows caps a float16 block's float32 copy
        scores, ids = [], []
        for start in range(0, n, rows):
            block = self.vectors[start:start + rows]
            s = q @ block.T if block.dtype == np.float32 else q @ block.astype(np.float32).T  # (n_queries, rows)
            top, idx = topk_rows(s, min(k, len(block)))
            scores.append(top)
            ids.append(idx + start)
        if len(scores) == 1:
            return scores[0], ids[0].astype(np.int64)
        return topk_rows(np.concatenate(scores, axis=1), k, np.concatenate(ids, axis=1).astype(np.int64))

    def query(self, texts: list[str], k: int = 5) -> list[list[tuple[float, Chunk]]]:
        """The k chunks closest to each text, best first, as (cosine, chunk) pairs."""
        scores, ids = self.search(self.embed(list(texts)), k)
        return [[(float(s), self.chunks[i]) for s, i in zip(srow, irow)] for srow, irow in zip(scores, ids)]

    def save(self, out_dir: str | Path) -> Path:
        """Write the three files, each through a temporary file and os.replace; index.json goes last."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "embeddings.npy", lambda tmp: np.save(tmp, self.vectors))
        write_jsonl(out / "chunks.jsonl", (dataclasses.asdict(c) for c in self.chunks))
        meta = dict(format=FORMAT, embedder=self.embedder_name, dim=int(self.vectors.shape[1]),
                    dtype=self.dtype.name, chunker=dataclasses.asdict(self.chunk_args), count=len(self.chunks))
        write_json(out / "index.json", meta, indent=1)
        return out

    @classmethod
    def load(cls, path: str | Path, embedder=None, mmap: bool = False) -> Index:
        """Read an index written by `save`; `embedder` overrides the recorded one (e.g. an object in tests)."""
        d = Path(path)
        if not (d / "index.json").is_file():
            raise FileNotFoundError(f"no index at {d} (index.json missing); build one with "
                                    f"`python -m retrieval.index --articles out/articles.jsonl --out {d}`")
        meta = _read_meta(d / "index.json")
        try:
            index = cls(embedder or meta["embedder"], ChunkArgs(**meta["chunker"]), meta["dtype"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{d / 'index.json'}: bad embedder/chunker/dtype ({e}); rebuild the index") from e
        try:
            vectors = np.load(d / "embeddings.npy", mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{d / 'embeddings.npy'}: unreadable ({e}); rebuild the index") from e
        chunks = _read_chunks(d / "chunks.jsonl")
        if not len(vectors) == len(chunks) == meta["count"]:
            raise ValueError(f"{d}: {len(vectors)} vectors, {len(chunks)} chunks, index.json says {meta['count']}; "
                             "a write was interrupted: rebuild the index")
        index.vectors, index.chunks = vectors, chunks
        index._hashes = {_text_hash(c.text) for c in chunks}
        return index


def _read_meta(path: Path) -> dict:
    """index.json, checked for the keys `load` needs; errors name the file and the key."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rebuild the index") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object; rebuild the index")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')} unsupported (expected {FORMAT})")
    missing = [k for k in ("embedder", "chunker", "dtype", "count") if k not in meta]
    if missing or not isinstance(meta["chunker"], dict):
        raise ValueError(f"{path}: key {(missing or ['chunker'])[0]!r} missing or malformed; rebuild the index")
    return meta


def _read_chunks(path: Path) -> list[Chunk]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; rebuild the index")
    chunks = []
    for lineno, row in read_jsonl(path):
        try:
            chunks.append(Chunk(**row))
        except TypeError as e:
            raise ValueError(f"{path}:{lineno}: not a chunk ({e}); rebuild the index") from None
    return chunks


@dataclass
class IndexArgs:
    articles: Path | None = field(default=None, metadata={
        "required": True, "help": "articles.jsonl ({url, title, published, text} per line)"})
    out: Path = field(default=Path("out/index"), metadata={"help": "index directory (extended if it exists)"})
    embedder: str = field(default="minilm", metadata={
        "help": "minilm | hashing[:dim] | openai[:model] | a BERT sentence-encoder directory"})
    dtype: Literal["float32", "float16"] = field(default="float32", metadata={
        "help": "stored vector type; float16 halves memory, scores move by up to ~1e-4"})
    batch_size: int = field(default=64, metadata={"help": "texts per embedding batch"})
    save_every: int = field(default=1000, metadata={"help": "save after this many articles, so a crash loses little"})

    def __post_init__(self):
        if self.articles is None:
            raise ValueError("articles is required: pass --articles out/articles.jsonl")
        if not Path(self.articles).is_file():
            raise FileNotFoundError(f"--articles {self.articles} not found; run `make scrape` first")
        if self.batch_size < 1 or self.save_every < 1:
            raise ValueError(f"batch_size={self.batch_size} and save_every={self.save_every} must be >= 1")


def build_index(iargs: IndexArgs, cargs: ChunkArgs, progress: bool = False) -> tuple[Index, int, int]:
    """Create or extend the index at iargs.out with the articles not yet in it -> (index, articles, chunks added)."""
    if (iargs.out / "index.json").is_file():
        index = Index.load(iargs.out)
        built = (index.embedder_name, dataclasses.asdict(index.chunk_args), index.dtype.name)
        if built != (iargs.embedder, dataclasses.asdict(cargs), iargs.dtype):
            raise ValueError(f"{iargs.out} was built with embedder={built[0]}, {built[1]}, dtype={built[2]}; "
                             "pass the same settings to extend it, or a new --out")
    else:
        index = Index(iargs.embedder, cargs, iargs.dtype)
    done = index.urls
    todo = [a for a in read_articles(iargs.articles) if a["url"] not in done]
    added = 0
    for i in tqdm(range(0, len(todo), iargs.save_every), desc=f"groups of {iargs.save_every} articles",
                  disable=not progress or len(todo) <= iargs.save_every):
        chunks = [c for a in todo[i:i + iargs.save_every] for c in chunk_article(a, cargs)]
        added += index.add(chunks, iargs.batch_size, progress=progress)
        index.save(iargs.out)
    if not (iargs.out / "index.json").is_file():
        index.save(iargs.out)  # an empty corpus still leaves a loadable index
    return index, len(todo), added


def main(argv: list[str] | None = None) -> None:
    iargs, cargs = parse_args(argv, IndexArgs, ChunkArgs, description=__doc__)
    index, n_articles, n_chunks = build_index(iargs, cargs, progress=True)
    print(f"{iargs.out}: +{n_articles} articles, +{n_chunks} chunks -> {len(index)} chunks "
          f"({index.embedder_name}, {index.chunk_args.chunker} {index.chunk_args.chunk_size} words)")


if __name__ == "__main__":
    main()
