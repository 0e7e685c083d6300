"""Retrieval: chunk articles, embed them, search a numpy cosine index, answer questions from it."""
