"""Where things run: the torch device (`auto` = CUDA only when it really works) and how a library call borrows a
caller's module without changing it, onnxruntime sessions (the providers that really ran, settings per use,
IOBinding on CUDA), latency measurement, and the process group under `torchrun`. Imports only the core."""
from bnport.runtime.device import DEVICE_CHOICES, cuda_works, modes_kept, module_on, resolve_torch_device
from bnport.runtime.distributed import Ranks, join_process_group
from bnport.runtime.latency import LatencyResult, measure_latencies, measure_latency
from bnport.runtime.sessions import CHECK, DEPLOY, GATE, RuntimeSession, SessionUse, create_session, cuda_status

__all__ = ["CHECK", "DEPLOY", "DEVICE_CHOICES", "GATE", "LatencyResult", "Ranks", "RuntimeSession", "SessionUse",
           "create_session", "cuda_status", "cuda_works", "join_process_group", "measure_latencies",
           "measure_latency", "modes_kept", "module_on", "resolve_torch_device"]
