"""Embeddings: OpenAI's /v1/embeddings and the native :embed, on models with the `embedding` capability
(docs/embeddings.md)."""
