"""The calibration stage: BN statistics re-estimated with every parameter frozen on the user's data mixed with noise
(`engine`), as `CalibrationSettings` say (`settings`), recorded in the run folder and resumed from it (`run_record`),
with its noise sources (`noise`), which images each step takes (`sampler`) and the counts a run keeps (`tally`).
Imports the core, runtime, data and model."""
from bnport.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "BnCalibrator": "bnport.calibrate.engine",
    "CalibrationResult": "bnport.calibrate.engine",
    "CalibrationSettings": "bnport.calibrate.settings",
    "MODES": "bnport.calibrate.settings",
    "NoiseMix": "bnport.calibrate.noise",
    "NoiseSource": "bnport.calibrate.noise",
    "calibrate": "bnport.calibrate.engine",
    "parse_noise": "bnport.calibrate.noise",
    "run_differences": "bnport.calibrate.run_record",
})
