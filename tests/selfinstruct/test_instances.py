"""Classification check and instance parsing/filters."""
import json

from selfinstruct.instances import classify_prompt, instance_prompt, parse_classification, parse_instances
from selfinstruct.seeds import CRYPTO_SEEDS, load_seed_tasks

SEEDS = load_seed_tasks(CRYPTO_SEEDS)


def test_classify_prompt_is_few_shot_and_ends_with_the_question():
    prompt = classify_prompt(SEEDS, "Tell whether the tweet is bullish")
    assert prompt.endswith("Task: Tell whether the tweet is bullish\nIs it classification?")
    assert "Is it classification? Yes" in prompt and "Is it classification? No" in prompt


def test_parse_classification():
    assert parse_classification(" Yes") is True
    assert parse_classification("no.") is False
    assert parse_classification("Maybe") is None and parse_classification("") is None


def test_instance_prompts_are_output_first_for_classification():
    clf = instance_prompt(SEEDS, "Classify the headline", True)
    gen = instance_prompt(SEEDS, "Summarise the article", False)
    assert "Class label:" in clf and clf.endswith("Task: Classify the headline\n")
    assert "Output:" in gen and "Class label:" not in gen and gen.endswith("Task: Summarise the article\n")


def test_parse_generation_instances():
    raw = ("Example 1\nInput: ETH fell 5%.\nOutput: Bearish news.\nExample 2\nInput: BTC rose.\nOutput: Bullish news."
           "\nInput 3: extra\nExample 3\nInput: Same\nOutput: same")
    instances, dropped = parse_instances(raw, False, truncated=False)
    assert instances == [{"input": "ETH fell 5%.", "output": "Bearish news."},
                         {"input": "BTC rose.", "output": "Bullish news."}]
    assert dropped == {"copies_input": 1}


def test_parse_no_input_task_and_truncation():
    assert parse_instances("Output: Staking locks coins to secure a chain.", False, False)[0] == [
        {"input": "", "output": "Staking locks coins to secure a chain."}]
    instances, dropped = parse_instances("Example 1\nInput: a\nOutput: b\nExample 2\nInput: c\nOutput: d is cu", False,
                                         truncated=True)
    assert instances == [{"input": "a", "output": "b"}] and dropped == {"truncated": 1}


def test_malformed_and_bad_instances_are_counted():
    assert parse_instances("Here are some ideas about the task.", False, False) == ([], {"unparseable": 1})
    assert parse_instances("Sure, labels: bullish, bearish", True, False) == ([], {"unparseable": 1})
    raw = "Example 1\nInput: a\nOutput:\nExample 2\nInput: x\nOutput: y\nExample 3\nInput: x\nOutput: y"
    assert parse_instances(raw, False, False) == ([{"input": "x", "output": "y"}],
                                                  {"empty_output": 1, "duplicate": 1})
    raw = "Example 1\nInput: x\nOutput: y\nExample 2\nInput: x\nOutput: z"  # one input, two answers
    assert parse_instances(raw, False, False) == ([], {"conflicting_outputs": 2})
    assert parse_instances("Example 1\nInput: Headline:\nOutput: y", False, False) == ([], {"incomplete": 1})


def test_parse_classification_instances():
    raw = ("Class label: Bullish\nInput: BTC ETF inflows hit a record.\n"
           "Class label: Bearish\nExchange halts withdrawals.")
    instances, dropped = parse_instances(raw, True, truncated=False)
    assert instances == [{"input": "BTC ETF inflows hit a record.", "output": "Bullish"},
                         {"input": "Exchange halts withdrawals.", "output": "Bearish"}]
    assert parse_instances("Class label: Montreal", True, False)[0] == [{"input": "", "output": "Montreal"}]


def test_crypto_seed_tasks_file():
    assert 35 <= len(SEEDS) <= 50 and len({t["instruction"] for t in SEEDS}) == len(SEEDS)
    assert any(t["is_classification"] for t in SEEDS) and not all(t["is_classification"] for t in SEEDS)
    for line in CRYPTO_SEEDS.read_text().splitlines():
        assert set(json.loads(line)) == {"id", "name", "instruction", "instances", "is_classification"}
