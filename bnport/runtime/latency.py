"""Latency of ONNX files on the device that scores them: median milliseconds per batch, per batch size.

Every file gets its own onnxruntime session from `bnport.runtime.sessions.create_session` (so the providers reported
are the ones that really ran, and CUDA runs through IOBinding, input copied from and outputs copied back to the host, as
scoring does). When several files are compared (`measure_latencies`), their runs are interleaved round by round, with
the starting file rotated, so that load from other processes on a shared machine hits every file alike and the
ratios between them stay meaningful even when the absolute figures drift.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from bnport.errors import BnportError

DEFAULT_BATCH_SIZES = (1, 8)
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3


@dataclass
class LatencyResult:
    """Median (and fastest) milliseconds per batch for each batch size, and what ran them.

    `median_ms[b]` is the median over `runs` timed runs of one batch of `b` images, after `warmup` untimed runs;
    `device` and `providers` are what onnxruntime really used; `threads` is the intra-op thread count (None: ORT's
    default, one per physical core); `input_shape` is one image's CxHxW; `settings` how the sessions ran (as deployed:
    bnport.runtime.sessions.DEPLOY).
    """

    median_ms: dict[int, float]
    min_ms: dict[int, float]
    runs: int
    warmup: int
    device: str
    providers: list[str]
    threads: int | None
    input_shape: list[int]
    settings: dict = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["median_ms"] = {str(b): v for b, v in self.median_ms.items()}
        d["min_ms"] = {str(b): v for b, v in self.min_ms.items()}
        return d

    def __str__(self) -> str:
        sizes = ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in self.median_ms.items())
        return (f"latency on {', '.join(self.providers)} (median of {self.runs}, "
                f"{self.threads or 'default'} threads): {sizes}")


def _check_options(batch_sizes, runs: int, warmup: int, threads: int | None) -> None:
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise BnportError(f"batch sizes must be positive, got {list(batch_sizes)}", "use e.g. 1,8")
    if runs < 1 or warmup < 0:
        raise BnportError(f"need at least one timed run and no negative warm-up (runs {runs}, warmup {warmup})",
                          "use e.g. --runs 20")
    if threads is not None and threads < 1:
        raise BnportError(f"threads must be at least 1, got {threads}", "leave it unset for onnxruntime's default")


def _image_shape(session, input_size: tuple[int, int] | None) -> list[int]:
    """CxHxW of one input image: the graph's static dims, `input_size` where they are symbolic."""
    dims = list(session.session.get_inputs()[0].shape)
    if len(dims) != 4:
        raise BnportError(f"the model's input has rank {len(dims)}, not NCHW", "export it with an NxCxHxW input")
    channels = dims[1] if isinstance(dims[1], int) else 3
    static = [d if isinstance(d, int) and d > 0 else None for d in dims[2:]]
    if input_size is not None:
        if any(s is not None and s != v for s, v in zip(static, input_size)):
            raise BnportError(f"input size {input_size[0]}x{input_size[1]} differs from the model's "
                              f"{dims[2]}x{dims[3]}", "leave the input size unset to use the model's")
        return [channels, *input_size]
    if None in static:
        raise BnportError("the model's input height/width are not fixed in the graph",
                          "pass input_size=(H, W)")
    return [channels, *static]


def _serialized(model):
    """A ModelProto as bytes; paths and bytes as they are."""
    return model.SerializeToString() if hasattr(model, "SerializeToString") else model


def measure_latencies(models: dict[str, str | os.PathLike | bytes], *, device: str = "cpu",
                      batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, runs: int | None = None,
                      warmup: int | None = None, threads: int | None = None,
                      input_size: tuple[int, int] | None = None, seed: int = 0,
                      tensorrt: tuple[str, ...] = ()) -> dict[str, LatencyResult]:
    """Latency of each model (path, serialized bytes or onnx.ModelProto), runs interleaved; see the module docstring.

    `device`: "cpu", "cuda" or "auto" as in `bnport.runtime.sessions.create_session`. `runs`: timed runs per batch size
    (None: DEFAULT_RUNS); `warmup`: untimed runs first (None: DEFAULT_WARMUP); `threads`: intra-op threads (None:
    onnxruntime's default). `input_size`: (H, W), needed only when the graph leaves them symbolic. Inputs are
    N(0, 1) images in normalised input space (the same for every model), so the figures do not depend on data.
    `tensorrt`: the models to run with the TensorRT provider first, where it really loads (INT8 files on CUDA); the
    result's `note` says when it did not.
    """
    runs = DEFAULT_RUNS if runs is None else int(runs)
    warmup = DEFAULT_WARMUP if warmup is None else int(warmup)
    batch_sizes = [int(b) for b in batch_sizes]
    _check_options(batch_sizes, runs, warmup, threads)
    if not models:
        raise BnportError("no model to time", "pass at least one ONNX file")
    from bnport.runtime.sessions import create_session

    sessions = {name: create_session(_serialized(model), device=device, threads=threads, tensorrt=name in tensorrt)
                for name, model in models.items()}
    shapes = {name: _image_shape(s, input_size) for name, s in sessions.items()}
    rng = np.random.default_rng(seed)
    names = list(sessions)
    medians: dict[str, dict[int, float]] = {name: {} for name in names}
    fastest: dict[str, dict[int, float]] = {name: {} for name in names}
    for batch in batch_sizes:
        inputs = {name: rng.standard_normal((batch, *shapes[name])).astype(np.float32) for name in names}
        for name in names:
            for _ in range(warmup):
                sessions[name].run_all(inputs[name])
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(runs):
            # rotate who goes first, so no file always runs right after another one's cache traffic
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                began = time.perf_counter()
                sessions[name].run_all(inputs[name])
                times[name].append((time.perf_counter() - began) * 1e3)
        for name in names:
            medians[name][batch] = statistics.median(times[name])
            fastest[name][batch] = min(times[name])
    return {name: LatencyResult(median_ms=medians[name], min_ms=fastest[name], runs=runs, warmup=warmup,
                                device=sessions[name].device, providers=list(sessions[name].providers),
                                threads=threads, input_shape=shapes[name], settings=dict(sessions[name].settings),
                                note=sessions[name].note)
            for name in names}


def measure_latency(model: str | os.PathLike | bytes, *, device: str = "cpu",
                    batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, runs: int | None = None,
                    warmup: int | None = None, threads: int | None = None,
                    input_size: tuple[int, int] | None = None, seed: int = 0) -> LatencyResult:
    """Latency of one model (path, serialized bytes or onnx.ModelProto); options as in `measure_latencies`."""
    return measure_latencies({"model": model}, device=device, batch_sizes=batch_sizes, runs=runs, warmup=warmup,
                             threads=threads, input_size=input_size, seed=seed)["model"]
