"""Tests of bnport.calibrate (the calibration engine, noise sources, the sampler, the tally)."""
