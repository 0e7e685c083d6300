"""Bootstrap prompt, parsing and filters: the paper's rules plus the crypto-domain fixes."""
import random

import pytest

from selfinstruct.bootstrap import (capitalise_first, encode_prompt, filter_reason, has_blocked_keyword,
                                    parse_instructions, sample_prompt)


def test_encode_prompt_is_the_papers_format():
    prompt = encode_prompt(["List three  BTC\nfacts:", "Explain staking."])
    assert prompt == "Come up with a series of tasks:\n1. List three BTC facts\n2. Explain staking.\n3."


def test_parse_completion_continues_after_the_next_number():
    text = (" explain what BTC is to a new investor\n10. Summarise the SEC filing of the miner\n"
            "11 . Rank ETH L2s by fees")
    assert parse_instructions(text, 9, chat=False) == [
        "Explain what BTC is to a new investor", "Summarise the SEC filing of the miner", "Rank ETH L2s by fees"]


def test_parse_chat_answer_drops_the_preamble_and_keeps_numbers_in_text():
    text = "Sure! Here are more:\n\n9. Explain why 3.5 million ETH left exchanges\n10.  Compare  BTC and\n  SOL fees"
    assert parse_instructions(text, 9, chat=True) == [
        "Explain why 3.5 million ETH left exchanges", "Compare BTC and SOL fees"]
    assert parse_instructions("I cannot help with that.", 9, chat=True) is None


def test_capitalise_only_the_first_letter():
    # str.capitalize is the paper's choice and mangles tickers and acronyms
    assert "explain why BTC and the SEC disagree".capitalize() == "Explain why btc and the sec disagree"
    assert capitalise_first("explain why BTC and the SEC disagree") == "Explain why BTC and the SEC disagree"
    assert capitalise_first("") == ""


@pytest.mark.parametrize("text,blocked", [
    ("Draw a picture of a bull market", True),
    ("Plot the BTC price over a year", True),
    ("Open the file and count the trades", True),
    ("Go to the exchange website and read the fees", True),
    ("Describe the IMAGES in the article", True),
    ("Explain what The Graph (GRT) indexes for dapps", False),
    ("Summarise why the lender files for bankruptcy", False),
    ("Explain why the exchange filed a lawsuit against the SEC", False),
    ("Summarise the SEC filings of the miner", False),  # "filings" is not the keyword "files"
    ("Describe the roadmap of the protocol", False),  # whole words only
])
def test_keyword_filter_with_domain_exceptions(text, blocked):
    assert has_blocked_keyword(text) is blocked


def test_domain_exceptions_can_be_turned_off_for_generic_tasks():
    assert has_blocked_keyword("Explain what The Graph indexes", domain_exceptions=False)
    assert not has_blocked_keyword("Explain what The Graph indexes")


@pytest.mark.parametrize("text,reason", [
    ("List three coins", "too_short"),
    ("word " * 151, "too_long"),
    ("Draw a chart image of BTC", "keyword"),
    ("Write a program that prices ETH options", "write_a_program"),
    ("\"Quote\" the CEO on the hack", "starts_with_punctuation"),
    ("Éxplique the BTC halving to me", "starts_non_ascii"),
    ("Explain the BTC halving to a new investor", None),
])
def test_filter_reasons(text, reason):
    assert filter_reason(text.strip()) == reason


def test_sample_prompt_mixes_machine_crypto_and_human():
    human = [f"h{i}" for i in range(175)]
    crypto = [f"c{i}" for i in range(40)]
    rng = random.Random(0)
    first = sample_prompt(rng, human, crypto, [], 8, 2, 3)
    assert len(first) == 8 and sum(x[0] == "c" for x in first) == 3 and sum(x[0] == "h" for x in first) == 5
    later = sample_prompt(rng, human, crypto, ["m1", "m2", "m3"], 8, 2, 3)
    assert [sum(x[0] == k for x in later) for k in "mch"] == [2, 3, 3]
    paper = sample_prompt(rng, human, [], ["m1", "m2"], 8, 2, 0)  # the paper's mix: 6 human + 2 machine
    assert sorted(x[0] for x in paper) == ["h"] * 6 + ["m"] * 2
    offline = sample_prompt(rng, [], crypto, ["m1", "m2"], 8, 2, 3)  # --no-human-seeds: ours fill the prompt
    assert sorted(x[0] for x in offline) == ["c"] * 6 + ["m"] * 2 and len(set(offline)) == 8
