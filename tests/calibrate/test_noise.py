"""Noise sources: spec parsing, blur against a float64 reference, noise statistics over many steps, ood images
read back from real files, fractals, and determinism in (seed, step, rank)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bnport.calibrate.noise import (
    BlurNoise,
    FractalNoise,
    GaussAddNoise,
    GaussAppendNoise,
    NoiseMix,
    OodNoise,
    blur_images,
    generate_fractal,
    parse_noise,
)
from bnport.data.transforms import InputSpec
from bnport.errors import BnportError

SMALL = InputSpec(height=8, width=8)


def _batch(n: int, spec: InputSpec, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 3, spec.height, spec.width), generator=torch.Generator().manual_seed(seed))


def _reference_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Direct 2-D convolution (float64) with a truncated, normalised 2-D Gaussian and reflect padding."""
    _, h, w = image.shape
    ry, rx = min(math.ceil(3 * sigma), h - 1), min(math.ceil(3 * sigma), w - 1)
    dy, dx = np.meshgrid(np.arange(-ry, ry + 1), np.arange(-rx, rx + 1), indexing="ij")
    kernel = np.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    padded = np.pad(image.astype(np.float64), ((0, 0), (ry, ry), (rx, rx)), mode="reflect")
    out = np.zeros(image.shape)
    for i in range(2 * ry + 1):
        for j in range(2 * rx + 1):
            out += kernel[i, j] * padded[:, i:i + h, j:j + w]
    return out


def test_blur_matches_float64_reference_and_clamps_radius():
    images = _batch(3, InputSpec(height=20, width=17), seed=1)
    sigmas = [0.7, 3.0, 8.0]  # 8.0: radius 24, clamped to 19 rows and 16 columns
    out = blur_images(images, sigmas)
    for k, sigma in enumerate(sigmas):
        np.testing.assert_allclose(out[k].numpy(), _reference_blur(images[k].numpy(), sigma), atol=1e-5, rtol=0)


def test_blur_keeps_constant_image_constant():
    images = torch.full((2, 3, 9, 11), 0.7)
    out = blur_images(images, [3.0, 5.0])
    assert torch.allclose(out, images, atol=1e-6)


def test_blur_fraction_and_counts_over_many_steps():
    mix = NoiseMix([BlurNoise(p=0.3, sigma_min=3, sigma_max=5)], SMALL, seed=3)
    batch = _batch(8, SMALL)
    before = batch.clone()
    total = 0
    steps = 300
    for step in range(steps):
        out, counts = mix.apply(batch, step)
        changed = int((out != batch).flatten(1).any(dim=1).sum())
        assert out.shape == batch.shape
        assert counts == {"data": 8, "blur": changed}
        total += changed
    assert torch.equal(batch, before), "apply must not change its input in place"
    # 2400 Bernoulli(0.3) draws: standard error 0.0094, so 0.05 is more than 5 of them.
    assert abs(total / (8 * steps) - 0.3) < 0.05


def test_blurred_rows_equal_a_blur_with_sigma_in_range():
    mix = NoiseMix([parse_noise("blur:p=1,sigma=4")], SMALL, seed=0)
    batch = _batch(4, SMALL)
    out, counts = mix.apply(batch, 0)
    assert counts["blur"] == 4
    for k in range(4):
        np.testing.assert_allclose(out[k].numpy(), _reference_blur(batch[k].numpy(), 4.0), atol=1e-5, rtol=0)


def test_gauss_append_counts_shapes_and_statistics():
    mix = NoiseMix([GaussAppendNoise(ratio=0.05, std=2.0)], SMALL, seed=7)
    batch = _batch(8, SMALL)
    appended_counts = []
    noise = []
    for step in range(1000):
        out, counts = mix.apply(batch, step)
        m = counts["gauss-append"]
        assert m in (0, 1) and set(counts) == {"data", "gauss-append"} and counts["data"] == 8
        assert out.shape == (8 + m, 3, 8, 8)
        assert torch.equal(out[:8], batch)
        appended_counts.append(m)
        noise.append(out[8:])
    # Stochastic rounding: E[m] = 0.05 * 8 = 0.4 even though floor(0.4) = 0; standard error 0.0155.
    assert abs(np.mean(appended_counts) - 0.4) < 0.08
    values = torch.cat(noise).flatten()
    assert values.numel() > 300 * 192
    assert abs(float(values.mean())) < 0.05
    assert abs(float(values.std()) - 2.0) < 0.05


def test_gauss_append_large_ratio_floor_plus_bernoulli():
    mix = NoiseMix([GaussAppendNoise(ratio=0.3, std=1.0)], SMALL, seed=1)
    seen = {mix.apply(_batch(10, SMALL), step)[1]["gauss-append"] for step in range(100)}
    assert seen == {3}, "0.3 * 10 is a whole number, so every batch gets exactly 3"
    seen = {mix.apply(_batch(8, SMALL), step)[1]["gauss-append"] for step in range(100)}
    assert seen == {2, 3}


def test_gauss_add_changes_every_image_with_std():
    spec = InputSpec(height=16, width=16)
    mix = NoiseMix([parse_noise("gauss-add:std=0.25")], spec, seed=0)
    batch = _batch(8, spec)
    out, counts = mix.apply(batch, 5)
    assert counts == {"data": 8, "gauss-add": 8}
    assert out.shape == batch.shape
    delta = (out - batch).flatten(1)
    # 768 values per image: the sample std is within ~3% of 0.25 (12% is 4 standard errors).
    for row in delta:
        assert abs(float(row.std()) - 0.25) < 0.03
        assert abs(float(row.mean())) < 0.04


def _write_pngs(folder, count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = (8, 8) if i % 2 == 0 else (13, 10)  # some need resizing to the spec
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _expected_tensors(paths, spec: InputSpec) -> list[torch.Tensor]:
    return [spec.to_tensor(np.array(Image.open(p).convert("RGB"))) for p in paths]


def test_ood_appends_images_read_from_files(tmp_path):
    paths = _write_pngs(tmp_path / "ood", 5)
    (tmp_path / "ood" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    source = parse_noise(f"ood:{tmp_path / 'ood'},ratio=1")
    assert source == OodNoise(path=str(tmp_path / "ood"), ratio=1.0)
    mix = NoiseMix([source], SMALL, seed=0)
    expected = _expected_tensors(paths, SMALL)
    used = set()
    for step in range(10):
        batch = _batch(6, SMALL)
        out, counts = mix.apply(batch, step)
        assert counts == {"data": 6, "ood": 6}
        assert out.shape == (12, 3, 8, 8)
        for image in out[6:]:
            matches = [k for k, ref in enumerate(expected) if torch.allclose(image, ref, atol=1e-6)]
            assert len(matches) == 1
            used.add(matches[0])
    assert len(used) > 1
    assert mix.describe()[0]["images"] == 6


def test_ood_skips_unreadable_files(tmp_path):
    good = _write_pngs(tmp_path / "mostly_bad", 1)
    for i in range(3):
        (tmp_path / "mostly_bad" / f"bad{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    mix = NoiseMix([OodNoise(path=str(tmp_path / "mostly_bad"), ratio=1.0)], SMALL, seed=0)
    out, counts = mix.apply(_batch(8, SMALL), 0)
    assert counts["ood"] == 8
    assert all(torch.allclose(image, _expected_tensors(good, SMALL)[0], atol=1e-6) for image in out[8:])


def test_ood_without_images_names_the_noise_source(tmp_path):
    (tmp_path / "empty").mkdir()
    source = parse_noise(f"ood:{tmp_path / 'empty'}")
    with pytest.raises(BnportError, match="noise source 'ood:.*empty,ratio=0.05'"):
        NoiseMix([source], SMALL, seed=0)


def test_generate_fractal_images():
    first = generate_fractal(np.random.default_rng(0), 112, 112)
    again = generate_fractal(np.random.default_rng(0), 112, 112)
    other = generate_fractal(np.random.default_rng(1), 112, 112)
    assert first.shape == (112, 112, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    rng = np.random.default_rng(5)
    for _ in range(20):
        image = generate_fractal(rng, 40, 56)
        assert image.shape == (40, 56, 3)
        background = np.all(image == image[0, 0], axis=-1)
        # A shape on a background: neither empty nor filling the image.
        assert 0.01 < 1 - background.mean() < 0.9


def test_fractal_source_in_mix_is_deterministic_and_varied():
    spec = InputSpec(height=24, width=24)
    mix = NoiseMix([FractalNoise(ratio=0.5)], spec, seed=11)
    batch = _batch(8, spec)
    out, counts = mix.apply(batch, 2, rank=1)
    again, counts_again = NoiseMix([FractalNoise(ratio=0.5)], spec, seed=11).apply(batch, 2, rank=1)
    assert counts == counts_again == {"data": 8, "fractal": 4}
    assert torch.equal(out, again)
    fractals = out[8:]
    assert float(fractals.min()) >= -1 and float(fractals.max()) <= 1
    assert all(float(image.std()) > 0.05 for image in fractals)
    assert not torch.equal(fractals[0], fractals[1])
    assert not torch.equal(mix.apply(batch, 3, rank=1)[0][8:], fractals)


def _full_mix(tmp_path, seed: int) -> NoiseMix:
    folder = tmp_path / "ood"
    if not folder.exists():
        _write_pngs(folder, 4)
    specs = ["blur:p=0.5,sigma=3-5", "gauss-add:std=0.1", "gauss-append:ratio=0.25,std=1", f"ood:{folder},ratio=0.25",
             "fractal:ratio=0.25"]
    return NoiseMix([parse_noise(s) for s in specs], SMALL, seed=seed)


def test_mixed_sources_counts_and_determinism(tmp_path):
    mix = _full_mix(tmp_path, seed=42)
    batch = _batch(8, SMALL)
    out, counts = mix.apply(batch, 17, rank=0)
    assert set(counts) == {"data", "blur", "gauss-add", "gauss-append", "ood", "fractal"}
    assert counts["data"] == 8 and counts["gauss-add"] == 8 and 0 <= counts["blur"] <= 8
    assert counts["gauss-append"] == counts["ood"] == counts["fractal"] == 2
    assert out.shape[0] == 8 + 2 + 2 + 2
    # A resumed run rebuilds the mix from the same seed and must see the same batch.
    resumed, resumed_counts = _full_mix(tmp_path, seed=42).apply(batch, 17, rank=0)
    assert torch.equal(out, resumed) and counts == resumed_counts
    other_rank, _ = mix.apply(batch, 17, rank=1)
    other_step, _ = mix.apply(batch, 18, rank=0)
    other_seed, _ = _full_mix(tmp_path, seed=43).apply(batch, 17, rank=0)
    for other in (other_rank, other_step, other_seed):
        assert not torch.equal(out[:8], other[:8])
    description = mix.describe()
    assert [d["name"] for d in description] == ["blur", "gauss-add", "gauss-append", "ood", "fractal"]
    json.dumps(description)


def test_no_sources_returns_batch_unchanged():
    batch = _batch(4, SMALL)
    out, counts = NoiseMix([], SMALL, seed=0).apply(batch, 0)
    assert torch.equal(out, batch) and counts == {"data": 4}


def test_batch_size_must_match_spec():
    with pytest.raises(ValueError, match="16x16"):
        NoiseMix([GaussAddNoise()], InputSpec(height=16, width=16), seed=0).apply(_batch(2, SMALL), 0)


def test_parse_defaults_forms_and_round_trip(tmp_path, monkeypatch):
    assert parse_noise("blur") == BlurNoise(p=0.05, sigma_min=3.0, sigma_max=5.0)
    assert parse_noise("blur:sigma=4") == BlurNoise(p=0.05, sigma_min=4.0, sigma_max=4.0)
    assert parse_noise("blur:p=0.1,sigma=2.5-6") == BlurNoise(p=0.1, sigma_min=2.5, sigma_max=6.0)
    assert parse_noise("gauss-append") == GaussAppendNoise(ratio=0.05, std=1.0)
    assert parse_noise("gauss-append:std=2,ratio=0.1") == GaussAppendNoise(ratio=0.1, std=2.0)
    assert parse_noise("gauss-add") == GaussAddNoise(std=0.1)
    assert parse_noise("fractal") == FractalNoise(ratio=0.05)
    assert parse_noise(f"ood:{tmp_path}") == OodNoise(path=str(tmp_path), ratio=0.05)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "relative").mkdir()
    assert parse_noise("ood:relative").path == str(tmp_path / "relative"), "run.json must not depend on the cwd"
    odd = tmp_path / "a,b"
    odd.mkdir()
    assert parse_noise(f"ood:{odd},ratio=0.2") == OodNoise(path=str(odd), ratio=0.2)
    for text in ("blur:p=0.05,sigma=3-5", "blur:p=0.2,sigma=4", "gauss-append:ratio=0.05,std=1", "gauss-add:std=0.1",
                 "fractal:ratio=0.05", f"ood:{odd},ratio=0.2"):
        source = parse_noise(text)
        assert source.spec() == text
        assert parse_noise(source.to_dict()["spec"]) == source
        assert source.to_dict()["name"] == text.split(":")[0]


@pytest.mark.parametrize("text, problem", [
    ("speckle:p=0.1", "unknown kind"),
    ("blur:p=1.5", "outside [0, 1]"),
    ("blur:sigma=5-3", "reversed"),
    ("blur:sigma=0", "must be > 0"),
    ("blur:q=0.1", "unknown key 'q'"),
    ("blur:p=0.1,p=0.2", "given twice"),
    ("blur:0.1", "key=value"),
    ("gauss-add:std=abc", "not a number"),
    ("gauss-append:ratio=nan", "finite"),
    ("gauss-append:ratio=-0.1", "outside [0, 1]"),
    ("ood", "needs a directory"),
    ("ood:/nonexistent/bnport/ood,ratio=0.1", "does not exist"),
    ("fractal:std=1", "unknown key 'std'"),
])
def test_parse_errors_name_the_spec(text, problem):
    with pytest.raises(BnportError) as info:
        parse_noise(text)
    assert text in str(info.value) and problem in str(info.value)
    expected_hint = "existing image folder" if problem == "does not exist" else "ood:DIR[,ratio=0.05]"
    assert expected_hint in info.value.hint
