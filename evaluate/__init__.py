"""Evaluation: financial sentiment on sets labelled by people (TFNS, Financial PhraseBank, your JSONL), the
sentiment pipeline behind `make sentiment`, and the news evaluation behind `make evaluate`.

    python -m evaluate {sentiment,sentiment-pipeline,news} [--help]     # evaluate/commands.py lists examples

Modules, one concern each (imports point down this list, never up):
    loaders.py   labelled files -> rows {text, label}
    metrics.py   classification, event, QA and coin scores (checked against scikit-learn / rouge-score)
    report.py    results.md / report.md tables and the bar charts
    sentiment.py the prompt, local and API scoring, the `sentiment` subcommand
    pipeline.py  convert -> LoRA train -> score every system -> report (`sentiment-pipeline`)
    news.py      base vs fine-tuned vs retrieval on labelled news (`news`)
    commands.py  the subcommands; __main__.py runs them

This package re-exports the names other code uses (`from evaluate import NewsArgs, evaluate_news`).
"""
from evaluate.commands import COMMANDS, main
from evaluate.loaders import LABEL_ALIASES, LABELS, TFNS_LABELS, load_sentiment
from evaluate.metrics import (coin_counts, event_metrics, normalize_answer, present_macro_f1, qa_scores,
                              sentiment_metrics, summary, token_f1)
from evaluate.news import (CLOSED_BOOK_INSTRUCTION, NEWS_SYSTEMS, NewsArgs, evaluate_news, extraction_decoding_schema,
                           extraction_instruction, extraction_schema, load_news, parse_extraction)
from evaluate.pipeline import TFNS_DIR, TRAIN_FLAGS, PipelineArgs, convert, run_pipeline, split_dev, tfidf_classifier
from evaluate.report import NEWS_METRICS, PUBLISHED
from evaluate.sentiment import (HEADLINE_INSTRUCTION, INSTRUCTION, PROMPTS, SentimentArgs, clean_text,
                                load_generator, parse_label, pick_shots, predict_api, predict_local, run_sentiment,
                                save_eval, score_predictions, sentiment_instruction, sentiment_prompt, to_alpaca)

__all__ = ["CLOSED_BOOK_INSTRUCTION", "COMMANDS", "HEADLINE_INSTRUCTION", "INSTRUCTION", "LABELS", "LABEL_ALIASES",
           "NEWS_METRICS", "NEWS_SYSTEMS", "PROMPTS", "PUBLISHED", "TFNS_DIR", "TFNS_LABELS", "TRAIN_FLAGS", "NewsArgs",
           "PipelineArgs",
           "SentimentArgs", "clean_text", "coin_counts", "convert", "evaluate_news", "event_metrics",
           "extraction_decoding_schema", "extraction_instruction", "extraction_schema", "load_generator",
           "load_news", "load_sentiment", "main", "normalize_answer", "parse_extraction", "parse_label",
           "pick_shots", "predict_api", "predict_local", "present_macro_f1", "qa_scores", "run_pipeline",
           "run_sentiment", "save_eval", "score_predictions", "sentiment_instruction", "sentiment_metrics",
           "sentiment_prompt", "split_dev", "summary", "tfidf_classifier", "to_alpaca", "token_f1"]
