"""The calibration stage: BN statistics re-estimated with every parameter frozen on the user's data mixed with noise
(`engine`), the noise sources (`noise`), which images each step takes (`sampler`) and the counts a run keeps
(`tally`). Imports the core, runtime, data and model."""
from bnport.calibrate.engine import MODES, BnCalibrator, CalibrationResult, calibrate
from bnport.calibrate.noise import NoiseMix, NoiseSource, parse_noise

__all__ = ["MODES", "BnCalibrator", "CalibrationResult", "NoiseMix", "NoiseSource", "calibrate", "parse_noise"]
