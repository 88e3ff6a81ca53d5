"""Where things run: the torch device (`auto` = CUDA only when it really works) and how a library call borrows a
caller's module without changing it, onnxruntime sessions (the providers that really ran, settings per use,
IOBinding on CUDA), latency measurement, and the process group under `torchrun`. Imports only the core."""
from bnport.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "CHECK": "bnport.runtime.sessions",
    "DEPLOY": "bnport.runtime.sessions",
    "DEVICE_CHOICES": "bnport.runtime.sessions",
    "GATE": "bnport.runtime.sessions",
    "LatencyResult": "bnport.runtime.latency",
    "Ranks": "bnport.runtime.distributed",
    "RuntimeSession": "bnport.runtime.sessions",
    "SessionUse": "bnport.runtime.sessions",
    "create_session": "bnport.runtime.sessions",
    "cuda_status": "bnport.runtime.sessions",
    "cuda_works": "bnport.runtime.device",
    "join_process_group": "bnport.runtime.distributed",
    "measure_latencies": "bnport.runtime.latency",
    "measure_latency": "bnport.runtime.latency",
    "modes_kept": "bnport.runtime.device",
    "module_on": "bnport.runtime.device",
    "resolve_torch_device": "bnport.runtime.device",
})
