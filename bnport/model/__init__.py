"""The model stage: the architecture registry (`arch`), MODEL spec + weights -> a ready module (`load`), the one
resolver every command uses (`resolve`: registry names, factories, TorchScript, snapshots, ONNX files) and BN-state
snapshots (`snapshot`). Imports the core, runtime and data."""
from bnport.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "LoadedModel": "bnport.model.load",
    "ModelOptions": "bnport.model.options",
    "OnnxModel": "bnport.model.resolve",
    "apply_bn_state": "bnport.model.snapshot",
    "bn_modules": "bnport.model.snapshot",
    "bn_state": "bnport.model.snapshot",
    "check_input_runs": "bnport.model.load",
    "load_model": "bnport.model.load",
    "load_snapshot": "bnport.model.snapshot",
    "load_snapshot_model": "bnport.model.snapshot",
    "open_onnx": "bnport.model.resolve",
    "resolve_model": "bnport.model.resolve",
})
