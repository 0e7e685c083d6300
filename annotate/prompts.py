"""Chain-of-thought prompts of the annotation stage: the model reasons in prose first, then ends with one JSON
object in a ```json block (llm.chat_json_answer keeps the prose as the reasoning and validates the object).

Each builder returns chat messages. The formats shown to the model mirror annotate/schema.py.
"""
from __future__ import annotations

SYSTEM = ("You are a careful analyst of cryptocurrency news. You read closely, use only what the article says, "
          "think step by step before answering, and end every answer with exactly one JSON object in a "
          "```json block.")

EVENT_GUIDE = """\
- hack: theft, exploit, breach or scam draining funds
- regulation: laws, regulators, court rulings, enforcement, bans, licences, tax rules
- listing: an exchange lists or delists a coin or trading pair
- etf: an exchange-traded fund or product: filing, approval, rejection, launch, flows
- partnership: companies or projects agree to work together, integrate, invest in or acquire one another
- price_move: a notable rise or fall in price is itself the news
- other: anything else (product launch, upgrade, earnings, people moves, ...)"""


def _header(article: dict) -> str:
    return f"Title: {article.get('title') or '(none)'}\nPublished: {article.get('published') or '(unknown)'}"


def clean_messages(article: dict, paragraphs: list[str]) -> list[dict]:
    """(a) Which numbered paragraphs are boilerplate the extractor kept by mistake."""
    numbered = "\n\n".join(f"[{i}] {p}" for i, p in enumerate(paragraphs, 1))
    user = f"""Below is a news article split into numbered paragraphs. The scraper may have kept boilerplate that \
is not part of the story: advertising, newsletter or social-media prompts, cookie or share notices, "read more" or \
related-article links, author bios, legal or investment disclaimers, navigation text.

{_header(article)}

{numbered}

First think step by step: for each paragraph that looks suspicious, say in a few words whether it belongs to the \
story. Keep every paragraph with facts, quotes or context of the story. Then answer with a JSON object in a ```json \
block listing the paragraph numbers to remove ([] if none):
```json
{{"drop": [4, 9]}}
```"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def extract_messages(article: dict, text: str) -> list[dict]:
    """(c) Coins, organisations, people, events with amounts and dates."""
    user = f"""Extract the structured facts of this crypto-news article. Use only what the article states.

{_header(article)}

Article:
{text}

First think step by step: list the coins and tokens named (with tickers), the organisations, the people and their \
roles; then decide what happened, the sums involved and when. Then answer with one JSON object in a ```json block, \
in this format:
```json
{{"coins": [{{"name": "Bitcoin", "ticker": "BTC"}}],
 "organizations": ["Example Exchange"],
 "people": [{{"name": "Jane Doe", "role": "chief executive of Example Exchange"}}],
 "events": [{{"type": "hack", "summary": "One sentence on what happened.",
             "amounts": [{{"value": 4100000, "currency": "USD", "what": "stolen"}}], "date": "2026-03-13"}}]}}
```
Rules:
- "type" is one of:
{EVENT_GUIDE}
- "value" is a plain number (4.1 million -> 4100000; 2,500 BTC -> 2500 with currency "BTC"); "currency" is an ISO \
code (USD, EUR) or a coin ticker.
- "date" is YYYY-MM-DD; resolve words like "on Tuesday" from the published date when you can, else null.
- Tickers are upper case, without "$"; null if the article gives none and none is well known.
- Use [] for anything the article does not mention."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def coin_label(coin: dict) -> str:
    return f"{coin['name']} ({coin['ticker']})" if coin.get("ticker") else coin["name"]


def sentiment_messages(article: dict, text: str, coins: list[dict]) -> list[dict]:
    """(b) Sentiment toward the market and toward each coin in `coins`, each with a short reason."""
    listed = ", ".join(coin_label(c) for c in coins) if coins else "(no coins named: answer \"coins\": [])"
    user = f"""Judge the sentiment of this crypto-news article toward the crypto market as a whole, and toward \
each of these coins: {listed}.

positive = good news for the price, adoption or safety of the market or the coin; negative = bad news for them; \
neutral = no clear direction, balanced, or merely informational.

{_header(article)}

Article:
{text}

First think step by step about what the news means for the market and for each listed coin. Then answer with one \
JSON object in a ```json block, with one entry per listed coin (use its ticker, or its name if it has none):
```json
{{"market": {{"sentiment": "negative", "reason": "One sentence."}},
 "coins": [{{"ticker": "BTC", "sentiment": "neutral", "reason": "One sentence."}}]}}
```"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
