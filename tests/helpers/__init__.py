"""Builders shared by the tests, the benchmarks and the fixture scripts: real image files (images), models with
realistic BatchNorm statistics and their weights files (models), calibration runs (runs), benchmark files (benchdata),
tiny IJB releases (ijb), RecordIO records (recordio), ONNX graphs built by hand (onnxgraphs), the timm-zoo BN patterns
(zoo) and a CPU stand-in for a device's moves (devicemoves). Fixtures stay in tests/conftest.py."""
