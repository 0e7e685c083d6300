"""Reports and plots: the sentiment pipeline's results.md + sentiment.png (our systems beside published figures)
and the news evaluation's report.md + news.png. Written atomically (jsonl.atomic_write).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend to set

from jsonl import atomic_write

# FinGPT v3 README (AI4Finance-Foundation/FinGPT, fingpt/FinGPT_v3/README.md), weighted F1 as published, not
# re-measured. Their FPB figures use BloombergGPT's split and train on FPB; we never train on FPB.
PUBLISHED = (("FinGPT v3.3 (Llama2-13B + LoRA)", 0.903, 0.882), ("GPT-4", 0.808, 0.833),
             ("ChatGPT", 0.736, 0.781), ("FinBERT", 0.733, 0.880), ("Llama2-7B-chat zero-shot", 0.296, 0.390))
# the sentiment table's row of one annotator scored against the majority vote (its accuracy = the agreement)
HUMAN = "one annotator vs the majority"
# (metric key, table header) of the news evaluation; every metric is in [0, 1]
NEWS_METRICS = (("sentiment_accuracy", "sentiment acc"), ("sentiment_f1_macro", "sentiment F1-m"),
                ("json_valid", "JSON valid"), ("coins_f1", "coins F1"), ("event_accuracy", "event acc"),
                ("event_f1_macro", "event F1-m"), ("qa_f1", "QA F1"), ("qa_rouge_l", "QA ROUGE-L"),
                ("qa_contains", "QA contains"), ("retrieval_hit", "retrieval hit"))


def _save(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight"))


def sentiment_report(out: Path, results: dict, set_names: list[str]) -> None:
    """results.md (our systems, then the published figures) and sentiment.png (weighted F1 per system and set)."""
    head = "| system | " + " | ".join(f"{s} acc | {s} F1-w | {s} F1-m" for s in set_names) + " |"
    lines = ["# Financial sentiment: TFNS / FPB / CryptoLin", "",
             "Measured here (`make sentiment`); F1-w = weighted F1, F1-m = macro F1. `dev` is held out from TFNS "
             "train; `tfns` is TFNS valid (the published test set); `fpb` is Financial PhraseBank AllAgree, "
             "never trained on (transfer from tweets to news sentences); `crypto` is CryptoLin dev, crypto-news "
             "headlines labelled by three people (majority vote), never trained on: a dev set for choosing prompts "
             "and calibration, its held-out rows judge the result. VADER and FinBERT are the predictions the "
             "CryptoLin file ships; `majority class` is TFNS train's, `of the set itself` each set's own.", "", head,
             "|---" * (1 + 3 * len(set_names)) + "|"]
    for system, by_set in results.items():
        cells = [f"{by_set[s]['accuracy']:.3f} | {by_set[s]['f1_weighted']:.3f} | {by_set[s]['f1_macro']:.3f}"
                 if s in by_set else "- | - | -" for s in set_names]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    agreement = [f"Inter-annotator agreement on {s}: {m['accuracy']:.3f} (how often one annotator's label equals "
                 f"the majority's, over {m['n']} (headline, annotator) pairs): the human ceiling for the rows above."
                 for system, by_set in results.items() if system.startswith(HUMAN) for s, m in by_set.items()]
    calibrated = [f"Label prior for {s}: offsets {_offsets(m['offsets'])} added to the LoRA's label log-probs, "
                  f"chosen on {s} (weighted F1 {m['f1_weighted_in_sample']:.3f} in sample, {m['f1_weighted']:.3f} "
                  f"out-of-fold over {m['folds']} folds, the row above; calibration_{s}.json)."
                  for by_set in results.values() for s, m in by_set.items() if "offsets" in m]
    if agreement or calibrated:
        lines += ["", *agreement, *calibrated]
    lines += ["", "Published (weighted F1, FinGPT v3 README, as published, not re-measured; their FPB split differs "
              "and they train on FPB):", "", "| model | TFNS F1-w | FPB F1-w |", "|---|---|---|"]
    lines += [f"| {name} | {tfns:.3f} | {fpb:.3f} |" for name, tfns, fpb in PUBLISHED]
    atomic_write(out / "results.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    _save(sentiment_plot(results, set_names), out / "sentiment.png")


def _offsets(offsets: dict) -> str:
    return ", ".join(f"{label} {value:+.2f}" for label, value in offsets.items() if value) or "none"


def sentiment_plot(results: dict, set_names: list[str]) -> Figure:
    """Weighted F1 per system, one bar per test set; the published figures hatched beside ours."""
    shown = [s for s in ("tfns", "fpb", "crypto") if s in set_names] or set_names[:2]
    names = list(results) + [p[0] for p in PUBLISHED]
    fig = Figure(figsize=(12, 4.5))
    ax = fig.subplots()
    width = 0.8 / len(shown)
    column = {"tfns": 1, "fpb": 2}  # PUBLISHED's figures; none for the other sets
    for j, s in enumerate(shown):
        ours = [results[n][s]["f1_weighted"] if s in results[n] else 0.0 for n in results]
        published = [p[column[s]] if s in column else 0.0 for p in PUBLISHED]
        xs = np.arange(len(names)) + (j - (len(shown) - 1) / 2) * width
        bars = ax.bar(xs, ours + published, width, label=s, color=f"C{j}")
        for b in bars[len(ours):]:
            b.set_hatch("//")
            b.set_alpha(0.6)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="weighted F1", ylim=(0, 1), title="Financial sentiment (hatched: published figures, not re-measured)")
    ax.legend()
    return fig


def news_report(path: Path, results: dict, setup: dict) -> None:
    """The markdown table (one row per system, one column per metric) with what each number means."""
    lines = ["# News evaluation: base vs fine-tuned vs retrieval", "",
             f"{setup['articles']} labelled articles and {setup['questions']} questions from `{setup['labels']}`; "
             f"model {setup['checkpoint']} ({setup['dtype']})"
             + (f", adapter `{setup['adapter']}`" if setup["adapter"] else "")
             + (f", API model `{setup['api_model']}`" if setup["api_model"] else "")
             + (f"; index {setup['index']}" if setup["index"] else "") + ". Greedy decoding"
             + ("; the local systems' extraction JSON decoded under its schema (--constrained)."
                if setup.get("constrained") else "."), "",
             "| system | " + " | ".join(h for _, h in NEWS_METRICS) + " | seconds |",
             "|---" * (len(NEWS_METRICS) + 2) + "|"]
    for system, m in results.items():
        cells = [f"{m[k]:.3f}" if k in m else "—" for k, _ in NEWS_METRICS]
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {m['seconds']} |")
    lines += ["", "- Sentiment and extraction give the model the article itself, so retrieval cannot change them: "
              "they are measured once per model (— in the + retrieval rows).",
              "- sentiment: market sentiment of the article, asked as `python -m evaluate sentiment` asks it (a local "
              "model ranks the label words by log-likelihood); acc = accuracy, F1-m = macro F1.",
              "- extraction: one prompt asks for JSON with `event_type` and `coins`. JSON valid: the answer holds "
              "such an object (llm.parse_json_answer); an invalid answer counts as no coins and no event. coins F1: "
              "micro F1 over all articles, a coin matching by name or ticker. event F1-m: macro F1 over event types.",
              "- QA: two questions per article, answers verbatim in it. F1: SQuAD token F1; ROUGE-L: F-measure as "
              "rouge-score computes it; contains: the normalised reference appears in the answer; citations like "
              "[1] are removed first. retrieval hit: the question's article is among the excerpts retrieved.",
              "- seconds: wall time of the row's tasks, model loading excluded.", ""]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))


def news_plot(path: Path, results: dict) -> None:
    """A grouped bar chart: one group per metric, one bar per system (absent metrics leave a gap)."""
    shown = [(k, h) for k, h in NEWS_METRICS if any(k in m for m in results.values())]
    fig = Figure(figsize=(12, 4.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(results))
    for j, (system, m) in enumerate(results.items()):
        xs = np.arange(len(shown)) + (j - (len(results) - 1) / 2) * width
        ax.bar(xs, [m.get(k, np.nan) for k, _ in shown], width, label=system, color=f"C{j}")
    ax.set_xticks(np.arange(len(shown)), [h for _, h in shown], rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="score", title="News: base vs fine-tuned vs retrieval")
    ax.legend(fontsize=8)
    _save(fig, path)
