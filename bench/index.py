"""Speed of the retrieval index's exact search vs faiss IndexFlatIP (same vectors, same threads, same top-k).

    python -m bench.index                       # 200,000 x 384 unit vectors, 1 and 256 queries, top-10
    python -m bench.index --n 50000 --threads 1

Both sides get the same thread budget: faiss through OpenMP, numpy's OpenBLAS through threadpoolctl. Ids must be
equal and scores equal to 1e-5 (faiss sums single-query dot products in its own SIMD order). Each timing is the
median of interleaved repeats, since other processes share this CPU.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cli import parse_args
from retrieval.chunk import Chunk
from retrieval.index import Index


@dataclass
class BenchArgs:
    n: int = field(default=200_000, metadata={"help": "index rows"})
    dim: int = field(default=384, metadata={"help": "vector dims (MiniLM's 384)"})
    k: int = field(default=10, metadata={"help": "top-k"})
    many: int = field(default=256, metadata={"help": "queries in the batched case"})
    threads: int = field(default=2, metadata={"help": "threads for both faiss (OpenMP) and numpy (OpenBLAS)"})
    repeats: int = field(default=5, metadata={"help": "timed runs of the batched case (4x as many of 1 query)"})

    def __post_init__(self):
        for name in ("n", "dim", "k", "many", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run(args: BenchArgs) -> dict[str, tuple[float, float]]:
    """{case: (our seconds, faiss seconds)} after checking both return the same top-k."""
    import faiss
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    vectors = _unit(rng.standard_normal((args.n, args.dim), dtype=np.float32))
    queries = _unit(rng.standard_normal((args.repeats * args.many, args.dim), dtype=np.float32))
    index = Index(embedder="none")
    index.add_vectors(vectors, [Chunk("", "", "", "", 0, 0)] * args.n)  # the search never reads chunk text
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(vectors)
    faiss.omp_set_num_threads(args.threads)
    results = {}
    with threadpool_limits(args.threads):
        for case, nq in (("1q", 1), (f"{args.many}q", args.many)):
            ours_t, faiss_t = [], []
            for r in range(args.repeats * 4 if nq == 1 else args.repeats):  # one query is cheap: more samples
                q = queries[r * nq:(r + 1) * nq]
                # interleaved, so a burst of load from others hits both sides; the order alternates so neither
                # side always starts while the other's BLAS threads are still spinning down
                for side in ((0, 1) if r % 2 else (1, 0)):
                    t0 = time.perf_counter()
                    if side == 0:
                        scores, ids = index.search(q, args.k)
                        ours_t.append(time.perf_counter() - t0)
                    else:
                        ref_scores, ref_ids = flat.search(q, args.k)
                        faiss_t.append(time.perf_counter() - t0)
                np.testing.assert_array_equal(ids, ref_ids, err_msg=f"{case}: ids differ from faiss")
                np.testing.assert_allclose(scores, ref_scores, atol=1e-5, err_msg=f"{case}: scores differ")
            results[case] = (float(np.median(ours_t)), float(np.median(faiss_t)))
    return results


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args(argv, BenchArgs, description=__doc__)
    results = run(args)
    from threadpoolctl import threadpool_info

    # numpy's and faiss's own OpenBLAS builds; OPENBLAS_CORETYPE, where this machine sets it, picks slower kernels
    blas = [f"{Path(i['filepath']).name.split('-')[0]} {i.get('version')} {i.get('architecture', '')}"
            for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"{args.n:,} x {args.dim} float32, top-{args.k}, {args.threads} threads; BLAS: {'; '.join(blas)}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print(f"{'case':>6} {'ours ms':>9} {'faiss ms':>9}")
    for case, (ours, ref) in results.items():
        print(f"{case:>6} {ours * 1e3:9.2f} {ref * 1e3:9.2f}")
    for case, (ours, ref) in results.items():
        print(f"index_search_{case}_vs_faiss: {ref / ours:.2f}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()
