"""The export stage: exact BatchNorm folding on the PyTorch graph (`fold_torch`) and the ONNX graph (`fold_onnx`),
the BN inventory (`inventory`), ONNX export behind the parity gate (`onnx_export`, `parity`) and lower-precision
files behind their own gate (`precision`). Imports the core, runtime, data and model."""
from bnport.export.fold_onnx import fold_onnx_bn
from bnport.export.fold_torch import FoldPlan, fold_bn, plan_folds
from bnport.export.inventory import Inventory, inspect_model
from bnport.export.onnx_export import ExportReport, export_model, export_onnx
from bnport.export.parity import ParityReference, ParityResult, check_parity

__all__ = ["ExportReport", "FoldPlan", "Inventory", "ParityReference", "ParityResult", "check_parity", "export_model",
           "export_onnx", "fold_bn", "fold_onnx_bn", "inspect_model", "plan_folds"]
