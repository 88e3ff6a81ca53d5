"""Tests of bnport.export (BN fold math, the torch and ONNX folds, inventory, ONNX export, parity, lower precisions)."""
