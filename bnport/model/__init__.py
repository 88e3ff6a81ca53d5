"""The model stage: the architecture registry (`arch`), MODEL spec + weights -> a ready module (`load`), the one
resolver every command uses (`resolve`: registry names, factories, TorchScript, snapshots, ONNX files) and BN-state
snapshots (`snapshot`). Imports the core, runtime and data."""
from bnport.model.load import LoadedModel, check_input_runs, load_model
from bnport.model.resolve import OnnxModel, open_onnx, resolve_model
from bnport.model.snapshot import apply_bn_state, bn_modules, bn_state, load_snapshot, load_snapshot_model

__all__ = ["LoadedModel", "OnnxModel", "apply_bn_state", "bn_modules", "bn_state", "check_input_runs", "load_model",
           "load_snapshot", "load_snapshot_model", "open_onnx", "resolve_model"]
