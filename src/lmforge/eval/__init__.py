"""Evaluation: perplexity (and, as they land, choice log-likelihood, generation metrics, RAG metrics)."""
