"""Retrieval-augmented generation: ingest, chunk, embed, store, retrieve, answer with citations."""
