"""Crypto-news scraping: sources -> feeds/sitemaps -> polite HTTP -> article extraction -> articles.jsonl.

    python -m scrape --help
    from scrape.extract import extract_article

Modules: `sources` (the registry), `http` (robots.txt, delays, retries, conditional GET), `feeds` (RSS/Atom and
sitemaps), `extract` (metadata and body text), `corpus` (the JSONL writer), `__main__` (the CLI that ties them).
"""
