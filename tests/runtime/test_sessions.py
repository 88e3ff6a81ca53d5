"""Tests for bnport.runtime.sessions: the ORT session factory reports the providers that really ran and never claims
CUDA it could not use."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from bnport.errors import BnportError
from bnport.runtime.sessions import create_session, cuda_status
from tests.helpers.onnxgraphs import gemm_model


@pytest.fixture
def gemm():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(5, 7)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    return weight, bias, gemm_model(weight, bias)


def test_cpu_session_runs_and_reports_cpu(gemm, tmp_path):
    weight, bias, data = gemm
    path = tmp_path / "gemm.onnx"
    path.write_bytes(data)
    session = create_session(path, device="cpu", threads=1)
    assert session.providers == ["CPUExecutionProvider"]
    assert session.device == "cpu"
    assert session.input_name == "data" and session.output_names == ["y", "r"]
    x = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32)
    expected = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    y, r = session.run_all(x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r, np.maximum(expected, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(session.run(x), y)
    assert "CPUExecutionProvider" in session.describe()


def test_auto_never_claims_cuda_it_did_not_get(gemm):
    session = create_session(gemm[2], device="auto")
    usable, reason = cuda_status()
    assert session.providers == session.session.get_providers()
    if usable:
        assert session.device == "cuda" and session.providers[0] == "CUDAExecutionProvider"
    else:
        assert session.device == "cpu"
        assert "CUDAExecutionProvider" not in session.providers
        assert reason and reason in session.note
        assert "CUDA not used" in session.describe()


def test_cuda_request_without_working_cuda_is_a_user_error(gemm):
    if cuda_status()[0]:
        pytest.skip("CUDA works here; the error path needs a machine where it does not")
    with pytest.raises(BnportError) as err:
        create_session(gemm[2], device="cuda")
    assert str(err.value).startswith("CUDA was requested but onnxruntime could not use it: ")
    assert err.value.hint == "install CUDA/cuDNN matching onnxruntime-gpu, or use --device cpu"


def test_failed_cuda_load_does_not_spam_stderr(gemm, capfd):
    if "CUDAExecutionProvider" not in ort.get_available_providers() or cuda_status()[0]:
        pytest.skip("needs onnxruntime-gpu without a working CUDA (the case where ORT prints its warnings)")
    cuda_status.cache_clear()
    create_session(gemm[2], device="auto")
    captured = capfd.readouterr()
    assert "Failed to create CUDAExecutionProvider" not in captured.err
    assert "Failed to load library" not in captured.err


@pytest.mark.parametrize("bad", ["missing.onnx", b"not an onnx model"])
def test_unreadable_models_are_user_errors(bad, tmp_path):
    target = str(tmp_path / bad) if isinstance(bad, str) else bad
    with pytest.raises(BnportError):
        create_session(target, device="cpu")


def test_unknown_device_is_a_user_error(gemm):
    with pytest.raises(BnportError, match="unknown device"):
        create_session(gemm[2], device="tpu")


@pytest.mark.gpu
def test_cuda_iobinding_matches_cpu(gemm):
    if not cuda_status()[0]:
        pytest.skip(f"no working CUDA for onnxruntime: {cuda_status()[1]}")
    data = gemm[2]
    x = np.random.default_rng(2).normal(size=(4, 7)).astype(np.float32)
    gpu = create_session(data, device="cuda")
    assert gpu.device == "cuda" and gpu.providers[0] == "CUDAExecutionProvider"
    cpu = create_session(data, device="cpu")
    for got, want in zip(gpu.run_all(x), cpu.run_all(x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gpu.run(x[:1]), cpu.run(x[:1]), rtol=1e-5, atol=1e-5)


def test_each_use_sets_only_what_differs_from_onnxruntimes_defaults(monkeypatch):
    from bnport.runtime.sessions import CHECK, DEPLOY, GATE, _device_id

    assert GATE.cuda_options(0) == {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    assert CHECK.cuda_options(0) == {"cudnn_conv_algo_search": "HEURISTIC"}  # a float16 file keeps TF32 allowed
    assert DEPLOY.cuda_options(0) == {}  # scoring and latency: exactly onnxruntime's defaults
    # device_id only where it is not 0: onnxruntime >= 1.26 warns about it ("No registered plugin EP device")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _device_id() == 1 and DEPLOY.cuda_options(_device_id()) == {"device_id": "1"}
    assert DEPLOY.describe(True) == {"use": DEPLOY.name, "use_tf32": True, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert "TF32 does not apply" in GATE.describe(False)["provider"]


def test_sessions_carry_their_use_into_the_figures(gemm):
    from bnport.runtime.sessions import DEPLOY, GATE

    assert create_session(gemm[2], device="cpu", use=GATE).settings["use"] == GATE.name
    assert create_session(gemm[2], device="cpu").settings["use"] == DEPLOY.name


def test_scoring_runs_pick_the_algorithm_search_by_length_and_tensorrt_is_one_line():
    from bnport.runtime.sessions import DEPLOY, EXHAUSTIVE_MIN_IMAGES, SHORT_RUN, scoring_use, tensorrt_status

    assert scoring_use(EXHAUSTIVE_MIN_IMAGES) is DEPLOY and scoring_use(EXHAUSTIVE_MIN_IMAGES - 1) is SHORT_RUN
    assert SHORT_RUN.cuda_options(0) == {"cudnn_conv_algo_search": "HEURISTIC"}  # TF32 as deployed
    # on CPU the two scoring uses run alike, so a CPU table does not speak of a cuDNN search
    assert SHORT_RUN.describe(on_cuda=False)["use"] == DEPLOY.describe(on_cuda=False)["use"]
    assert "cuDNN" not in SHORT_RUN.describe(on_cuda=False)["use"]
    assert "cuDNN" in SHORT_RUN.describe(on_cuda=True)["use"]
    usable, reason = tensorrt_status()
    if not usable:  # no GPU here, or no TensorRT: a reason in one line, not a traceback
        assert reason and "\n" not in reason
