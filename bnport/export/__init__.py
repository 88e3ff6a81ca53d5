"""The export stage: exact BatchNorm folding on the PyTorch graph (`fold_torch`) and the ONNX graph (`fold_onnx`),
the BN inventory (`inventory`), ONNX export behind the parity gate (`onnx_export`, `parity`) and lower-precision
files behind their own gate (`precision`). Imports the core, runtime, data and model."""
from bnport.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "ExportReport": "bnport.export.export_report",
    "ExportSettings": "bnport.export.settings",
    "FoldPlan": "bnport.export.fold_torch",
    "Inventory": "bnport.export.inventory",
    "ParityReference": "bnport.export.parity",
    "ParityResult": "bnport.export.parity",
    "PrecisionSettings": "bnport.export.settings",
    "check_parity": "bnport.export.parity",
    "export_model": "bnport.export.onnx_export",
    "export_onnx": "bnport.export.onnx_export",
    "fold_bn": "bnport.export.fold_torch",
    "fold_onnx_bn": "bnport.export.fold_onnx",
    "inspect_model": "bnport.export.inventory",
    "plan_folds": "bnport.export.fold_torch",
})
