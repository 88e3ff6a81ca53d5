"""Tests of bnport.score (scoring, benchmarks, embeddings, the cache, metrics, selection, tables, the handoff
bundle)."""
