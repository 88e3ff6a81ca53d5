"""Tests for bnport.score.embed on small ONNX models built by hand and run on onnxruntime: `to_network_input` equals
`InputSpec.to_tensor` (RGB and BGR, per-channel mean and std), the features `embed_images` and `embed_many` return
equal the model run directly with onnxruntime on the image plus its horizontal mirror (or the image alone), across
batch boundaries and for a slice of the images, and a model that gives NaN or not one N x D row per image is refused
with a BnportError naming the problem."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bnport.data.transforms import InputSpec
from bnport.errors import BnportError
from bnport.runtime.sessions import create_session
from bnport.score.embed import embed_images, embed_many, to_network_input
from tests.helpers.onnxgraphs import image_embedder

H, W = 10, 8
SPECS = [InputSpec(H, W), InputSpec(H, W, mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0), bgr=True),
         InputSpec(H, W, mean=(0.0,), std=(255.0,))]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Seven RGB uint8 images whose left and right halves differ, so a mirror changes the features."""
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(7, H, W, 3), dtype=np.uint8)
    batch[:, :, : W // 2] //= 3
    return batch


def _direct(model: bytes, images: np.ndarray, spec: InputSpec, *, flip: bool) -> np.ndarray:
    """The model on onnxruntime, fed inputs made by InputSpec.to_tensor, plus its run on each mirrored image."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def run(batch):
        x = torch.stack([spec.to_tensor(np.ascontiguousarray(image)) for image in batch]).numpy()
        return session.run(None, {"data": x})[0]

    features = run(images)
    return features + run(images[:, :, ::-1]) if flip else features


@pytest.mark.parametrize("spec", SPECS, ids=["insightface", "bgr-per-channel", "unit-range"])
def test_to_network_input_equals_the_input_spec_tensor(images, spec):
    x = to_network_input(images, spec)
    expected = torch.stack([spec.to_tensor(image) for image in images]).numpy()
    assert x.dtype == np.float32 and x.shape == (7, 3, H, W) and x.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(x, expected)  # the same float32 subtraction and division, bit for bit


@pytest.mark.parametrize("spec", SPECS[:2], ids=["insightface", "bgr-per-channel"])
@pytest.mark.parametrize("flip", [True, False])
def test_features_equal_the_model_run_directly_on_image_and_mirror(images, spec, flip):
    weight = np.random.default_rng(1).normal(size=(5, 3 * H * W)) / 20
    model = image_embedder(weight)
    got = embed_images(create_session(model, device="cpu"), images, spec, flip=flip, batch_size=3, progress=False)
    expected = _direct(model, images, spec, flip=flip)
    assert got.dtype == np.float32 and got.shape == (7, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    part = embed_images(create_session(model, device="cpu"), images, spec, flip=flip, batch_size=2, start=2, stop=5,
                        progress=False)
    np.testing.assert_allclose(part, expected[2:5], rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    if flip:  # the mirror really enters: the image alone gives other features
        alone = _direct(model, images, spec, flip=False)
        assert not np.allclose(got, 2 * alone, atol=1e-3)


def test_embed_many_gives_each_model_its_own_features_in_the_arrays_given(images):
    spec = SPECS[1]
    models = [image_embedder(np.random.default_rng(seed).normal(size=(4, 3 * H * W)) / 20) for seed in (2, 3)]
    out = [np.full((7, 4), np.nan, np.float32), np.full((7, 4), np.nan, np.float32)]
    results = embed_many([create_session(m, device="cpu") for m in models], images, spec, batch_size=4, out=out,
                         progress=False)
    assert results[0] is out[0] and results[1] is out[1]
    for model, features in zip(models, results):
        expected = _direct(model, images, spec, flip=True)
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(results[0], results[1])


def test_nan_features_are_an_error_naming_the_first_bad_image(images):
    spec = InputSpec(H, W)
    batch = images.copy()
    batch[4] = 0  # the darkest possible image: its mean input is -1, and the model takes its square root
    batch[5] = 0
    batch[[0, 1, 2, 3, 6]] = 255
    session = create_session(image_embedder(np.zeros((1, 3 * H * W)), head="sqrt"), device="cpu")
    with pytest.raises(BnportError, match=r"the model gave NaN/Inf features \(first at image 4\)") as info:
        embed_images(session, batch, spec, batch_size=3, progress=False)
    assert "--mean/--std/--bgr" in info.value.hint
    fine = embed_images(session, batch[:4], spec, flip=False, progress=False)  # the bright images alone are fine
    np.testing.assert_allclose(fine, np.full((4, 1), 1.0), atol=1e-6)


@pytest.mark.parametrize("head, shape", [("vector", "[3]"), ("transposed", "[4, 3]")])
def test_a_model_whose_output_is_not_one_row_per_image_is_refused(images, head, shape):
    session = create_session(image_embedder(np.ones((4, 3 * H * W)), head=head), device="cpu")
    with pytest.raises(BnportError) as info:
        embed_images(session, images[:3], InputSpec(H, W), progress=False)
    assert info.value.args[0] == f"the model's first output has shape {shape} for a batch of 3"
    assert "one embedding per image (N x D)" in info.value.hint


def test_images_of_another_size_than_the_spec_are_refused(images):
    session = create_session(image_embedder(np.ones((2, 3 * H * W))), device="cpu")
    with pytest.raises(BnportError, match=f"benchmark images are {H}x{W}, the model takes 12x{W}"):
        embed_images(session, images, InputSpec(12, W), progress=False)
