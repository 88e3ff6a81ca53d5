"""The bnport test suite, one package per stage of the library (tests/runtime, tests/data, tests/model,
tests/calibrate, tests/export, tests/score, tests/report) beside the tests of the core and top modules; helpers that
build real files live in tests/helpers, fixture files in tests/fixtures (not collected)."""
