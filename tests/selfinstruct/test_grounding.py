"""Domain grounding: answers are checked against the article before they become training records."""
import json

import pytest

from selfinstruct.grounding import SCHEMAS, check, excerpt, to_record

TEXT = ("Bitcoin rose 5 percent on Tuesday after record inflows into spot ETFs. BlackRock's fund took in most of it. "
        "Analysts said BTC could test its previous high.")


def test_qa_answer_must_be_in_the_article():
    good = {"question": "How much did Bitcoin rise?", "answer": "5 percent",
            "evidence": "Bitcoin rose 5 percent on Tuesday after record inflows into spot ETFs."}
    assert check("qa", good, TEXT) == []
    assert check("qa", dict(good, answer="7 percent"), TEXT)  # a number the article does not contain
    assert check("qa", dict(good, evidence="Bitcoin fell on Tuesday."), TEXT)
    assert check("qa", dict(good, answer=" "), TEXT)


def test_extraction_names_must_be_in_the_article():
    obj = {"coins": ["Bitcoin", "BTC"], "organizations": ["BlackRock"], "amounts": [{"value": 5, "unit": "percent"}],
           "event_type": "price_move"}
    assert check("extract", obj, TEXT) == []
    assert check("extract", dict(obj, organizations=["Fidelity"]), TEXT)
    rec = to_record("extract", obj, TEXT, "Extract ...")
    assert json.loads(rec["output"]) == obj and rec["input"] == TEXT


def test_sentiment_and_summary_records():
    obj = {"sentiment": "bullish", "reason": "Record ETF inflows lifted the price."}
    assert check("sentiment", obj, TEXT) == []
    record = to_record("sentiment", obj, TEXT, "Classify ...")
    assert record["output"] == "Bullish. Record ETF inflows lifted the price."
    assert check("summary", {"summary": "Bitcoin rose."}, TEXT)  # too short to be a summary
    assert check("summary", {"summary": "Bitcoin rose 5 percent after record spot ETF inflows led by BlackRock."},
                 TEXT) == []


def test_schemas_reject_what_the_model_gets_wrong():
    from llm import validate
    assert validate({"sentiment": "very bullish", "reason": "x"}, SCHEMAS["sentiment"])
    assert validate({"coins": "BTC", "organizations": [], "amounts": [], "event_type": "hack"}, SCHEMAS["extract"])


def test_excerpt_cuts_at_a_sentence_and_keeps_the_title():
    article = {"url": "u", "title": "Title", "text": "First sentence here. " * 50}
    text = excerpt(article, 200)
    assert text.startswith("Title\n\n") and text.endswith(".") and len(text) <= 200 + len("Title\n\n")
