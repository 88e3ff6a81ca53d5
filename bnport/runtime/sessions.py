"""The one onnxruntime session factory: which providers really ran, CUDA only when it really works, IOBinding on CUDA.

onnxruntime-gpu lists CUDAExecutionProvider as available even when its libraries or the driver are missing, and then
silently runs on CPU after printing a warning. `create_session` asks for CUDA, checks `session.get_providers()` for
what is actually active, and either raises a `BnportError` (`device="cuda"`) or falls back to CPU and says so in
`RuntimeSession.note` (`device="auto"`); a session is never reported as CUDA when it fell back. ORT's own warning
spam about the failed CUDA load is kept off the terminal: sessions log errors only, and the one probe that tries CUDA
captures what ORT prints and reads the loader's reason from it.

A session is made for a use (`SessionUse`), which decides its CUDA settings and is recorded with every figure:
`GATE` (the float32 parity gate and the float32 side of a precision gate) turns TF32 off, so the file is judged on
full float32 arithmetic against float64, and takes cuDNN's heuristic algorithm choice (the gate runs a few batches:
an exhaustive search would cost more than the runs); `CHECK` (a converted FP16/INT8 file under its gate) runs as
deployed but with the heuristic search; `DEPLOY` (scoring, latency) is onnxruntime's own defaults (TF32 allowed,
exhaustive search), as a production session runs the file; a scoring run too short to pay for the exhaustive search
(`scoring_use`) takes the heuristic choice instead (`SHORT_RUN`). FP16 never has TF32 forced off: in the cuDNN frontend
that leaves some float16 convolutions without any execution plan. `device_id` is passed only under torchrun on a
rank other than 0 (onnxruntime >= 1.26 looks the option up among plugin devices first and warns when none is there).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnport.errors import BnportError

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # --device, for torch and onnxruntime alike
_CUDA_EP = "CUDAExecutionProvider"
_TRT_EP = "TensorrtExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
# ORT severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal; sessions log errors only.
_QUIET = 3
_CUDA_HINT = "install CUDA/cuDNN matching onnxruntime-gpu, or use --device cpu"


@dataclass(frozen=True)
class SessionUse:
    """What a session is for, and so how it runs on CUDA: `tf32` False forces full float32 matmul/conv
    (`use_tf32=0`); `algo_search` is cuDNN's convolution algorithm search (EXHAUSTIVE is onnxruntime's default)."""

    name: str
    tf32: bool
    algo_search: str
    cpu_name: str | None = None  # the name on CPU, where the CUDA settings that tell two uses apart do not apply

    def cuda_options(self, device_id: int) -> dict[str, str]:
        """Provider options that differ from onnxruntime's defaults (TF32 on, exhaustive search, device 0)."""
        options = {} if self.tf32 else {"use_tf32": "0"}
        if self.algo_search != "EXHAUSTIVE":
            options["cudnn_conv_algo_search"] = self.algo_search
        if device_id:
            options["device_id"] = str(device_id)
        return options

    def describe(self, on_cuda: bool) -> dict:
        """For reports and cards: the use and, on CUDA, the settings it ran with."""
        if not on_cuda:
            return {"use": self.cpu_name or self.name, "provider": "CPU (float32 arithmetic; TF32 does not apply)"}
        return {"use": self.name, "use_tf32": self.tf32, "cudnn_conv_algo_search": self.algo_search}


GATE = SessionUse("parity gate", tf32=False, algo_search="HEURISTIC")
CHECK = SessionUse("lower-precision gate", tf32=True, algo_search="HEURISTIC")
DEPLOY = SessionUse("as deployed (onnxruntime defaults)", tf32=True, algo_search="EXHAUSTIVE")
SHORT_RUN = SessionUse("as deployed, heuristic cuDNN search (a short run)", tf32=True, algo_search="HEURISTIC",
                       cpu_name=DEPLOY.name)
# below this many images an exhaustive cuDNN search (seconds per new input shape) costs more than it saves
EXHAUSTIVE_MIN_IMAGES = 50_000


def scoring_use(images: int) -> SessionUse:
    """How a scoring session runs over `images` images: as deployed (DEPLOY), with cuDNN's heuristic algorithm
    choice instead of its exhaustive search when the run is too short to pay for the search (SHORT_RUN)."""
    return DEPLOY if images >= EXHAUSTIVE_MIN_IMAGES else SHORT_RUN


@dataclass
class RuntimeSession:
    """An onnxruntime InferenceSession plus what actually runs it.

    `providers` is `session.get_providers()` after creation (what ORT really uses, not what was asked for);
    `device` is "cuda" only when CUDAExecutionProvider is among them; `note` explains a CPU fallback under "auto";
    `settings` is `SessionUse.describe` of how it runs.
    """

    session: Any
    device: str
    providers: list[str]
    input_name: str
    output_names: list[str]
    note: str = ""
    settings: dict = field(default_factory=dict)
    _binding: Any = field(default=None, repr=False)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run one float32 batch and return the first output."""
        return self.run_all(x)[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one float32 batch and return every output, in graph order."""
        return self.run_prepared(self.prepare(x))

    def prepare(self, x: np.ndarray):
        """A float32 batch as this session's runs take it: on CUDA an OrtValue already on the GPU (copied once, and
        usable by every session on the same GPU), else the contiguous array."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.device != "cuda":
            return x
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(x, "cuda", _device_id())

    def run_prepared(self, value) -> list[np.ndarray]:
        """Run a batch made by `prepare` (on CUDA through IOBinding: input and outputs on the GPU, outputs copied
        back once); every output, in graph order."""
        if self.device != "cuda":
            return self.session.run(self.output_names, {self.input_name: value})
        if self._binding is None:
            self._binding = self.session.io_binding()
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_ortvalue_input(self.input_name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", _device_id())
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def describe(self) -> str:
        """One line: providers that ran, and why CUDA was not used when it was not."""
        text = f"onnxruntime providers: {', '.join(self.providers)}"
        return f"{text} ({self.note})" if self.note else text


def _session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Collect what native code writes to fd 2 meanwhile: ORT logs a failed CUDA provider load there as an error,
    whatever the session's log severity, so the probe keeps it off the user's terminal and reads the reason from it."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def _load_failure(log: str) -> str:
    """The loader's reason from ORT's "Failed to load library ... with error: REASON" line ("" if absent)."""
    match = re.search(r"with error: ([^\n\x1b]+)", log)
    if not match:
        return ""
    needs = re.search(r"Require (cuDNN \S+ and CUDA \S+?)\.? ", log)
    return match.group(1).strip() + (f" (this onnxruntime-gpu needs {needs.group(1)})" if needs else "")


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip wheels, when present, so ORT finds them as torch does."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload(directory="")
    except Exception:  # noqa: BLE001 - a failed preload only means CUDA will not load; the check below says why
        return


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether onnxruntime's CUDA provider really runs a session here, checked once per process."""
    import onnxruntime as ort

    if _CUDA_EP not in ort.get_available_providers():
        return False, f"this onnxruntime build has no {_CUDA_EP} (installed package: onnxruntime, not onnxruntime-gpu)"
    _preload_cuda_libraries()
    probe = _probe_model()
    with _native_stderr_captured() as log:
        session = ort.InferenceSession(probe, _session_options(1),
                                       providers=[(_CUDA_EP, DEPLOY.cuda_options(_device_id())), _CPU_EP])
    if _CUDA_EP in session.get_providers():
        return True, ""
    reason = _load_failure("".join(log)) or f"{_CUDA_EP} is listed but fell back to CPU (no usable GPU or driver)"
    return False, reason


def _probe_model() -> bytes:
    """A one-Relu ONNX model: the smallest session a provider can be tried on."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(probe)
    return probe.SerializeToString()


@functools.lru_cache(maxsize=1)
def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): whether onnxruntime's TensorRT provider really runs a session here (it needs CUDA and the
    TensorRT libraries), checked once per process; its load failure is read from what ORT prints, kept off the
    terminal."""
    import onnxruntime as ort

    if _TRT_EP not in ort.get_available_providers():
        return False, f"this onnxruntime build has no {_TRT_EP}"
    usable, reason = cuda_status()
    if not usable:
        return False, f"CUDA is not usable ({reason})"
    probe = _probe_model()
    with _native_stderr_captured() as log:
        try:
            session = ort.InferenceSession(probe, _session_options(1),
                                           providers=[_TRT_EP, (_CUDA_EP, DEPLOY.cuda_options(_device_id())), _CPU_EP])
        except Exception as err:  # noqa: BLE001 - a provider that fails to start means "not usable", said once
            return False, str(err).splitlines()[0][:200]
    if _TRT_EP in session.get_providers():
        return True, ""
    return False, _load_failure("".join(log)) or "its libraries did not load (install TensorRT for this onnxruntime)"


def resolve_device(device: str) -> tuple[str, str]:
    """("cuda" | "cpu", note) for onnxruntime under --device auto|cpu|cuda; raises `BnportError` when "cuda" is asked
    for and does not really work. The note says why CUDA is not used under "auto" ("" otherwise)."""
    if device not in DEVICE_CHOICES:
        raise BnportError(f"unknown device {device!r}", "use --device auto, cpu or cuda")
    if device == "cpu":
        return "cpu", ""
    usable, reason = cuda_status()
    if usable:
        return "cuda", ""
    if device == "cuda":
        raise BnportError(f"CUDA was requested but onnxruntime could not use it: {reason}", _CUDA_HINT)
    return "cpu", f"CUDA not used: {reason}"


def _device_id() -> int:
    """The GPU this process uses: its LOCAL_RANK under torchrun (each process takes its own GPU, as torch does)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def create_session(model: str | os.PathLike | bytes, *, device: str = "auto", threads: int | None = None,
                   use: SessionUse = DEPLOY, tensorrt: bool = False) -> RuntimeSession:
    """Open an ONNX model (path or serialized bytes) on onnxruntime.

    `device`: "cpu"; "cuda" (raises `BnportError` unless CUDA really runs); "auto" (the default: CUDA when it really
    runs, else CPU, with the reason in `.note`). `threads`: intra-op threads, None for onnxruntime's default. `use`:
    GATE, CHECK or DEPLOY (the default: onnxruntime's own settings); see the module docstring. `tensorrt`: on CUDA,
    put the TensorRT provider first when it really loads (for INT8 files); when it does not, `.note` says why in one
    line.
    """
    import onnxruntime as ort

    target, note = resolve_device(device)
    use_cuda = target == "cuda"
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise BnportError(f"ONNX model not found: {model}", "check the path")
        source: str | bytes = os.fspath(model)
    else:
        source = bytes(model)
    providers: list[Any] = [(_CUDA_EP, use.cuda_options(_device_id())), _CPU_EP] if use_cuda else [_CPU_EP]
    if use_cuda and tensorrt:
        usable, why = tensorrt_status()
        if usable:
            providers.insert(0, _TRT_EP)
        else:
            note = f"TensorRT not used: {why}"
    try:
        session = ort.InferenceSession(source, _session_options(threads), providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... per problem
        raise BnportError(f"onnxruntime could not load the model: {str(err).splitlines()[0]}",
                          "check that the file is a complete ONNX model exported for an opset onnxruntime supports")\
            from None
    active = list(session.get_providers())
    on_cuda = _CUDA_EP in active
    if use_cuda and not on_cuda:
        if device == "cuda":
            raise BnportError(f"CUDA was requested but onnxruntime could not use it: {_CUDA_EP} fell back to CPU "
                              "for this model", _CUDA_HINT)
        note = "CUDA not used: this session fell back to CPU"
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BnportError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); bnport feeds one "
                          "image batch", "export the model with a single NCHW image input")
    return RuntimeSession(session=session, device="cuda" if on_cuda else "cpu", providers=active,
                          input_name=inputs[0].name, output_names=[o.name for o in session.get_outputs()], note=note,
                          settings=use.describe(on_cuda))
