"""The calibration stage: BN statistics re-estimated with every parameter frozen on the user's data mixed with noise
(`engine`; layer by layer in sequential mode: `sequential`), as `CalibrationSettings` say (`settings`), recorded in
the run folder and resumed from it (`run_record`), with its noise sources (`noise`), which images each step takes
(`sampler`), the counts a run keeps (`tally`), float64 channel moments (`moments`) and the consistency figure of
stored statistics against an eval-mode forward (`consistency`). Imports the core, runtime, data and model."""
from bnport.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "BnCalibrator": "bnport.calibrate.engine",
    "CalibrationResult": "bnport.calibrate.engine",
    "CalibrationSettings": "bnport.calibrate.settings",
    "MODES": "bnport.calibrate.settings",
    "bn_consistency": "bnport.calibrate.consistency",
    "NoiseMix": "bnport.calibrate.noise",
    "NoiseSource": "bnport.calibrate.noise",
    "calibrate": "bnport.calibrate.engine",
    "parse_noise": "bnport.calibrate.noise",
    "run_differences": "bnport.calibrate.run_record",
})
