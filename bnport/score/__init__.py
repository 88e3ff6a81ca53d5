"""Scoring: benchmarks -> embeddings -> pair scores across models, and the metrics published tables use."""
