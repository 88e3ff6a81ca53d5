"""`bnport run` in tests: the input files a config names (weights of a trained iresnet_tiny, a folder of calibration
images, an insightface .bin pack) and the config text around a test's own [calibrate] section."""
from __future__ import annotations

from pathlib import Path

from tests.helpers.benchdata import write_bin_pack
from tests.helpers.images import write_images
from tests.helpers.models import write_trained_weights


def write_pipeline_inputs(root: Path, *, images: int = 40, pairs: int = 30) -> Path:
    """root/w.safetensors, root/calib/ (`images` real images) and root/lfw.bin (`pairs` pairs); returns `root`."""
    write_trained_weights(root / "w.safetensors")
    write_images(root / "calib", images)
    write_bin_pack(root / "lfw.bin", pairs)
    return root


def pipeline_config(out: str, calibrate: str, *, fpr: str = "[1e-2, 1e-1]") -> str:
    """A `bnport run` config on those inputs: iresnet_tiny on the CPU, the given [calibrate] body (and any
    [[calibrate.recipe]] tables after it), the TorchScript exporter, lfw.bin scored and selected by TPR@1e-1."""
    return (f'out = "{out}"\ndevice = "cpu"\n\n[model]\nspec = "iresnet_tiny"\nweights = "w.safetensors"\n\n'
            f'[calibrate]\ndata = "calib"\n{calibrate.strip()}\n\n[export]\nexporter = "torchscript"\n\n'
            f'[score]\nbench = ["lfw.bin"]\nfpr = {fpr}\nselect = "tpr@1e-1"\ncache_dir = "cache"\n')


def assert_same_scores(a: Path, b: Path) -> None:
    """Two score folders hold the same result: TPR per model and benchmark, per-pair scores (to 1e-6) and the
    selected model (a resumed run against one that was never interrupted)."""
    import json

    import numpy as np

    first = json.loads((a / "table.json").read_text())
    second = json.loads((b / "table.json").read_text())
    assert [r["tpr"] for r in first["results"]] == [r["tpr"] for r in second["results"]]
    for ra, rb in zip(first["results"], second["results"]):
        np.testing.assert_allclose(np.load(ra["scores_file"]), np.load(rb["scores_file"]), rtol=0, atol=1e-6)
    assert first["selection"]["selected"] == second["selection"]["selected"]
