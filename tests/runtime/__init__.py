"""Tests of bnport.runtime (device moves, onnxruntime sessions)."""
