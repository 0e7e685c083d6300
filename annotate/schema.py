"""The JSON schemas of the annotation stage: what the model must answer at each step, and what a line of
`annotations.jsonl` holds. They use only the JSON-schema subset `llm.validate` implements.

A successful line of annotations.jsonl (ok = true):

    {"url": "https://...", "title": "...", "published": "2026-03-14T09:30:00Z", "model": "gpt-3.5-turbo", "ok": true,
     "sentiment": "negative",                      # toward the crypto market as a whole
     "rationale": "A large exchange hack ...",     # the model's short reason for that label
     "coins": [{"name": "Ether", "ticker": "ETH", "sentiment": "negative", "reason": "..."}],
     "entities": {"organizations": ["Harbor Exchange"], "people": [{"name": "Mara Quist", "role": "CEO"}]},
     "events": [{"type": "hack", "summary": "...", "date": "2026-03-13",
                 "amounts": [{"value": 41000000, "currency": "USD", "what": "stolen"}]}],
     "removed_paragraphs": [7],                   # 1-based paragraphs the cleaning step dropped as boilerplate
     "clean_text": "...",                          # the article without them (cut at --max-chars)
     "reasoning": {"clean": "...", "extract": "...", "sentiment": "..."}}   # the chain of thought per step

A failure line (ok = false) keeps what the model said so it can be inspected or retried (--retry-failed):

    {"url": "...", "title": "...", "model": "...", "ok": false, "step": "extract",
     "error": "$.events[0].type: \"airdrop\" is not one of [...]", "raw": "<the model's last answer>"}
"""

SENTIMENTS = ["positive", "negative", "neutral"]
# What happened, coarsely: the labels evaluate.py scores. "price_move" is a notable rise or fall being the news;
# "listing" covers exchange listings and delistings; "etf" any exchange-traded fund or product filing/approval.
EVENT_TYPES = ["hack", "regulation", "listing", "etf", "partnership", "price_move", "other"]

_TEXT = {"type": "string"}
_SENTIMENT = {"enum": SENTIMENTS}

CLEAN_SCHEMA = {
    "description": "Step (a): which numbered paragraphs are boilerplate (ads, newsletter prompts, share or "
                   "cookie notices, 'read more' links, author bios, disclaimers) rather than the news itself.",
    "type": "object",
    "required": ["drop"],
    "properties": {
        "drop": {"type": "array", "items": {"type": "integer", "minimum": 1},
                 "description": "1-based paragraph numbers to remove; [] when the article is clean"},
    },
}

EXTRACT_SCHEMA = {
    "description": "Step (c): structured facts stated in the article; nothing inferred from outside it.",
    "type": "object",
    "required": ["coins", "organizations", "people", "events"],
    "properties": {
        "coins": {"type": "array", "description": "every cryptocurrency or token the article names",
                  "items": {"type": "object", "required": ["name", "ticker"],
                            "properties": {"name": {"type": "string", "description": "e.g. Bitcoin"},
                                           "ticker": {"type": ["string", "null"],
                                                      "description": "upper-case symbol, e.g. BTC; null if "
                                                                     "the article gives none and none is known"}}}},
        "organizations": {"type": "array", "items": _TEXT,
                          "description": "companies, exchanges, funds, regulators, projects (not coins)"},
        "people": {"type": "array", "description": "people named, with their role when the article says it",
                   "items": {"type": "object", "required": ["name"],
                             "properties": {"name": _TEXT, "role": {"type": ["string", "null"]}}}},
        "events": {"type": "array", "description": "the news events, most important first",
                   "items": {"type": "object", "required": ["type", "summary", "amounts", "date"],
                             "properties": {
                                 "type": {"enum": EVENT_TYPES},
                                 "summary": {"type": "string", "description": "one sentence"},
                                 "amounts": {"type": "array", "description": "sums of money or coins involved",
                                             "items": {"type": "object", "required": ["value", "currency"],
                                                       "properties": {
                                                           "value": {"type": "number", "minimum": 0,
                                                                     "description": "a plain number: 4.1 "
                                                                                    "million -> 4100000"},
                                                           "currency": {"type": "string",
                                                                        "description": "ISO code or ticker: "
                                                                                       "USD, EUR, BTC"},
                                                           "what": {"type": ["string", "null"]}}}},
                                 "date": {"type": ["string", "null"],
                                          "description": "YYYY-MM-DD when the event happened, if stated"}}}},
    },
}

SENTIMENT_SCHEMA = {
    "description": "Step (b): sentiment toward the crypto market and toward each coin the article names.",
    "type": "object",
    "required": ["market", "coins"],
    "properties": {
        "market": {"type": "object", "required": ["sentiment", "reason"],
                   "properties": {"sentiment": _SENTIMENT, "reason": _TEXT}},
        "coins": {"type": "array",
                  "items": {"type": "object", "required": ["ticker", "sentiment", "reason"],
                            "properties": {"name": _TEXT, "ticker": {"type": ["string", "null"]},
                                           "sentiment": _SENTIMENT, "reason": _TEXT}}},
    },
}

ANNOTATION_SCHEMA = {
    "description": "One line of annotations.jsonl: a success (ok = true) or a recorded failure (ok = false).",
    "type": "object",
    "required": ["url", "ok", "model"],
    "properties": {
        "url": _TEXT, "title": {"type": ["string", "null"]}, "published": {"type": ["string", "null"]},
        "model": _TEXT, "ok": {"type": "boolean"},
        "sentiment": _SENTIMENT, "rationale": _TEXT,
        "coins": {"type": "array",
                  "items": {"type": "object", "required": ["name", "ticker", "sentiment", "reason"],
                            "properties": {"name": _TEXT, "ticker": {"type": ["string", "null"]},
                                           "sentiment": _SENTIMENT, "reason": _TEXT}}},
        "entities": {"type": "object", "required": ["organizations", "people"],
                     "properties": {"organizations": EXTRACT_SCHEMA["properties"]["organizations"],
                                    "people": EXTRACT_SCHEMA["properties"]["people"]}},
        "events": EXTRACT_SCHEMA["properties"]["events"],
        "removed_paragraphs": CLEAN_SCHEMA["properties"]["drop"],
        "clean_text": _TEXT,
        "reasoning": {"type": "object", "additionalProperties": _TEXT},
        "step": {"enum": ["clean", "extract", "sentiment"]}, "error": _TEXT, "raw": _TEXT,
    },
}
