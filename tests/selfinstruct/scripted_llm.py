"""A deterministic stand-in for the model behind tests/fakeopenai.py: answers every Self-Instruct request from
its content (not its arrival order), so an interrupted run and an uninterrupted one see the same answers.

Some answers are deliberately broken, to exercise the filters: no numbered list, an empty answer, an answer cut
off by the length limit, a blocked keyword, a too-short item, a copy of a seed task, unparseable or
self-contradicting instances, truncated JSON, and a grounded answer that is not in the article (fixed on repair).
"""
from __future__ import annotations

import hashlib
import json
import random
import re

from tests.fakeopenai import chat_response, completion_response

WORDS = ("ledger validator slippage custody liquidity oracle rollup bridge airdrop halving mempool staking "
         "treasury auditor regulator exchange wallet token futures options basis funding spread arbitrage "
         "volatility momentum breakout support resistance candle volume orderbook depth whale miner hashrate "
         "difficulty emission supply inflation yield lending collateral margin leverage liquidation insurance "
         "governance proposal quorum delegate bounty exploit patch testnet mainnet fork consensus finality "
         "latency throughput sharding sequencer prover circuit commitment snapshot vesting unlock cliff "
         "allocation founder investor retail sentiment rumour headline analyst forecast quarter earnings "
         "revenue margin balance custody reserve attestation stablecoin peg redemption mint burn index basket "
         "rebalance portfolio hedge exposure correlation dominance rotation season cycle bottom top rally "
         "crash recovery drawdown").split()
TICKERS = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LINK", "AVAX"]
SEED_COPY = "Suggest some games that can be played by a group of people."  # a seed task


def _rng(*parts) -> random.Random:
    return random.Random(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest())


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.sample(WORDS, n))


def _bootstrap(prompt: str, seed: int) -> tuple[str, str]:
    if seed % 7 == 3:
        return "I am sorry, but I cannot come up with more tasks right now.", "stop"
    if seed % 7 == 5:
        return "", "stop"
    rng = _rng("boot", prompt, seed)
    nxt = int(re.search(r"\n(\d+)\.$", prompt).group(1))
    items = [f"Explain how {rng.choice(TICKERS)} {_phrase(rng, 6)} matters to traders",
             f"Summarise the {_phrase(rng, 5)} news for {rng.choice(TICKERS)} holders",
             f"Classify whether the {_phrase(rng, 4)} headline is bullish or bearish",
             "Draw an image of the BTC price chart",  # keyword filter
             "List coins",  # too short
             SEED_COPY,  # an exact duplicate
             "Suggest some fun games that can be played by a group of people."]  # ROUGE-L 0.95 to that seed
    text = "Here are some more tasks:\n\n" + "\n".join(f"{nxt + i}. {t}" for i, t in enumerate(items))
    return text, "length" if seed % 7 == 6 else "stop"


def _classify(prompt: str) -> str:
    task = prompt.rsplit("Task: ", 1)[1].split("\n", 1)[0]
    h = int(hashlib.sha256(task.encode()).hexdigest(), 16)
    return "Maybe" if h % 11 == 0 else "Yes" if task.startswith("Classify") else "No"


def _instances(prompt: str) -> str:
    task = prompt.rsplit("Task: ", 1)[1].strip()
    rng = _rng("inst", task)
    h = int(hashlib.sha256(task.encode()).hexdigest(), 16)
    if prompt.startswith("For each classification task"):
        if h % 5 == 0:
            return "These labels depend on context."  # no "Class label:": unparseable
        return "\n".join(f"Class label: {label}\nInput: {_phrase(rng, 8)}" for label in ("Bullish", "Bearish"))
    if h % 6 == 0:
        return ""
    examples = [(_phrase(rng, 7), _phrase(rng, 9)) for _ in range(3)]
    if h % 6 == 1:
        examples.append((examples[0][0], examples[0][0]))  # an output that copies its input
    if h % 6 == 2:
        examples.append(examples[1])  # a duplicate
    return "\n".join(f"Example {i + 1}\nInput: {inp}\nOutput: {out}" for i, (inp, out) in enumerate(examples))


def _grounded(messages: list[dict]) -> str:
    user = messages[1]["content"]
    text = user.split("Article:\n", 1)[1].rsplit("\n\n", 1)[0]
    repair = len(messages) > 2
    if "BROKEN" in text:  # truncated JSON, even after the repair request
        return '```json\n{"question": "What happened to'
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", text.split("\n\n", 1)[-1]) if s.strip()]
    first = sentences[0]
    if "Write one question" in user:
        answer = " ".join(first.split()[:4])
        if "HALLUCINATE" in text and not repair:
            answer = "Seventeen unicorns"  # not in the article: the check fails, the repair fixes it
        return json.dumps({"question": "What does the article report first?", "answer": answer,
                           "evidence": first})
    if "Extract what the article mentions" in user:
        coins = [t for t in TICKERS if t in text]
        return "Here is the extraction:\n```json\n" + json.dumps(
            {"coins": coins, "organizations": [], "amounts": [{"value": 5, "unit": "percent"}],
             "event_type": "price_move"}) + "\n```"
    if "bullish, bearish or neutral" in user:
        return json.dumps({"sentiment": "bullish" if "rose" in text else "neutral",
                           "reason": f"The article says: {first}"})
    return json.dumps({"summary": " ".join(sentences[:2])})


def respond(path: str, body: dict):
    """fakeopenai `respond`: chat and completion endpoints, answered from the request's content."""
    if path.endswith("/chat/completions"):
        messages = body["messages"]
        content = messages[-1]["content"] if len(messages) == 1 else messages[0]["content"]
        if len(messages) == 1 and content.startswith("Come up with a series of tasks:"):
            text, finish = _bootstrap(content, body.get("seed", 0))
            return 200, {}, chat_response(text, finish_reason=finish)
        if len(messages) == 1 and "Is it classification?" in content:
            return 200, {}, chat_response(_classify(content))
        if len(messages) == 1:
            return 200, {}, chat_response(_instances(content))
        return 200, {}, chat_response(_grounded(messages))
    prompt = body["prompt"]
    if prompt.startswith("Come up with a series of tasks:"):
        text, finish = _bootstrap(prompt, body.get("seed", 0))
        text = text.split("\n\n", 1)[1].split(". ", 1)[1] if "\n\n" in text else text  # continue after "9."
        return 200, {}, completion_response(" " + text, finish_reason=finish)
    if "Is it classification?" in prompt:
        return 200, {}, completion_response(" " + _classify(prompt))
    return 200, {}, completion_response(_instances(prompt))
