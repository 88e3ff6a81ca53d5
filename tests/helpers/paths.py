"""Where the repository, the test suite and its fixture files are, for tests at any depth and for the scripts of
tests/benchmarks and tests/fixtures."""
from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"
