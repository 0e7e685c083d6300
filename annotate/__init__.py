"""Chain-of-thought annotation of crypto news: clean, sentiment, structured extraction -> annotations.jsonl.

    python -m annotate --articles out/articles.jsonl --out out/annotations.jsonl
    make annotate ARGS="--model gpt-4o-mini --concurrency 8"

annotate/schema.py documents the output; annotate/prompts.py holds the prompts; annotate/pipeline.py runs them.
"""
