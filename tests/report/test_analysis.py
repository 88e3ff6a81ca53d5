"""The BN analysis views' numbers (bnport.report.analysis) against an independent computation: the log-likelihood
with torch.distributions.Normal on activations hooked in a separate eval forward, the distance to the clean centre
with numpy in float64; layer choice on small and large models; zero-variance channels named, never NaN; the views in
the report of a real run."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bnport.cli import cli
from bnport.model.arch import create_model
from bnport.model.snapshot import bn_modules
from bnport.report.analysis import InputGroup, analyse_model, chosen_layers, input_groups
from tests.helpers.runs import copy_run


def _small_model() -> torch.nn.Module:
    """Four BN layers (fewer than ten): a 2-d stack and a 1-d head, with non-trivial statistics."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5), torch.nn.BatchNorm1d(5))
    g = torch.Generator().manual_seed(1)
    for _, bn in bn_modules(model):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.1)
    return model.eval()


def _groups() -> list[InputGroup]:
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(10, 3, 16, 16, generator=g) * 0.5 + 0.2
    return [InputGroup("clean", clean), InputGroup("noise", torch.randn(7, 3, 16, 16, generator=g) * 2)]


def _hooked(model, name: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bn = dict(model.named_modules())[name]
    seen = {}
    handle = bn.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach().clone(), y=o.detach().clone()))
    with torch.no_grad():
        model.eval()(images)
    handle.remove()
    return seen["x"], seen["y"]


def test_likelihood_and_centre_distances_equal_an_independent_computation():
    model = _small_model()
    names = [n for n, _ in bn_modules(model)]
    assert chosen_layers(names) == names  # fewer than ten BN layers: every one of them
    groups = _groups()
    result = analyse_model(model, "m", groups, names, samples=10 ** 9)
    clean_y = {name: _hooked(model, name, groups[0].images)[1].double().reshape(10, -1).numpy() for name in names}
    for name in names:
        bn = dict(model.named_modules())[name]
        normal = torch.distributions.Normal(bn.running_mean.double(), (bn.running_var.double() + bn.eps).sqrt())
        for group in groups:
            x, y = _hooked(model, name, group.images)
            x = x.double()
            moved = x.movedim(1, -1)  # channels last, so the per-channel Normal broadcasts
            expected = (-normal.log_prob(moved)).mean(dim=-1).reshape(-1).numpy()
            got = result.figures[name][group.name]
            np.testing.assert_allclose(np.sort(got.nll), np.sort(expected), rtol=1e-9, atol=1e-9)
            assert got.nll_median == pytest.approx(float(np.median(expected)), rel=1e-9)
            flat = y.double().reshape(len(y), -1).numpy()
            centre = clean_y[name].mean(axis=0)
            cosine = flat @ centre / (np.linalg.norm(flat, axis=1) * np.linalg.norm(centre))
            np.testing.assert_allclose(got.cosine, cosine, rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(got.distance, np.linalg.norm(flat - centre, axis=1), rtol=1e-9)


def test_large_models_get_the_first_and_last_five_layers():
    names = [n for n, _ in bn_modules(create_model("iresnet_tiny"))]
    assert len(names) > 10
    assert chosen_layers(names) == names[:5] + names[-5:]


def test_zero_variance_channels_are_named_and_every_figure_is_finite():
    model = _small_model()
    bn = model[4]
    with torch.no_grad():
        bn.running_var[[1, 5]] = 0.0  # dead channels, as a pruned or collapsed model has
    names = [n for n, _ in bn_modules(model)]
    result = analyse_model(model, "m", _groups(), names)
    assert result.excluded == {"4": [1, 5]}
    for layer in names:
        for figures in result.figures[layer].values():
            for values in (figures.nll, figures.cosine, figures.distance):
                assert np.isfinite(values).all()
            assert np.isfinite(figures.nll_median)


def test_input_groups_follow_the_runs_noise_sources():
    from bnport.calibrate.noise import blur_images
    from bnport.data.transforms import InputSpec

    clean = torch.rand(4, 3, 32, 32)
    manifest = {"calibration": {"noise": [{"name": "blur", "p": 0.1, "sigma_min": 1.0, "sigma_max": 3.0},
                                          {"name": "fractal", "ratio": 0.1}]}}
    groups = input_groups(manifest, InputSpec(height=32, width=32), clean)
    assert [g.name for g in groups] == ["clean", "blur sigma=1", "blur sigma=3", "fractals"]
    assert torch.equal(groups[1].images, blur_images(clean, [1.0] * 4))
    assert groups[3].images.shape == clean.shape
    plain = input_groups({"calibration": {"noise": []}}, InputSpec(height=32, width=32), clean)
    assert [g.name for g in plain] == ["clean", "gaussian images", "fractals"]  # something to compare with


def test_report_draws_the_analysis_views_with_an_ood_group(shared_ema_run, tmp_path):
    from tests.helpers.images import write_images

    run = copy_run(shared_ema_run, tmp_path / "world") / "run"
    ood = tmp_path / "ood"
    write_images(ood, 6, seed=9)
    result = CliRunner().invoke(cli, ["report", str(run), "--ood", str(ood), "--analysis-images", "8"])
    assert result.exit_code == 0, result.output
    for name in ("likelihood.png", "centre_cosine.png", "centre_distance.png", "likelihood_per_snapshot.png"):
        with Image.open(run / "report" / name) as image:
            assert image.format == "PNG" and image.width > 600
    report = (run / "report" / "report.md").read_text()
    assert "## How the BN layers see clean and noise inputs" in report and "ood ood" in report
    assert "](likelihood_per_snapshot.png)" in report
    missing = CliRunner().invoke(cli, ["report", str(run), "--ood", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "out-of-domain images" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
