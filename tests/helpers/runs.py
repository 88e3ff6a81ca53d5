"""Calibration runs for the tests: `tiny_run` calibrates iresnet_tiny on real images in a folder of its own, and
`copy_run` gives a test its own copy of such a folder (the run, its images and its weights), so that a test which
scores, damages or moves files never changes what another test sees of a shared run (tests/conftest.py's
`shared_ema_run` and `shared_exact_run`)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tests.helpers.images import write_images
from tests.helpers.models import write_trained_weights


def tiny_run(root: Path, *, images: int = 16, trained: bool = True, **settings) -> Path:
    """A calibration run of iresnet_tiny in root/run, on `images` real images written to root/calib (with weights
    from `write_trained_weights` in root/w.safetensors when `trained`, else its seeded initialisation), quiet and on
    the CPU; `settings` (mode, batch_size, epochs, noise...) go to bnport.calibrate.engine.calibrate."""
    from bnport.calibrate.engine import calibrate
    from bnport.calibrate.settings import CalibrationSettings
    from bnport.model.load import load_model

    weights = write_trained_weights(root / "w.safetensors") if trained else None
    write_images(root / "calib", images)
    calibrate(load_model("iresnet_tiny", weights=weights), root / "calib", root / "run",
              CalibrationSettings(workers=0, **settings), device="cpu", progress=False, log=lambda m: None)
    return root / "run"


def copy_run(root: Path, dest: Path) -> Path:
    """A copy of the `tiny_run` folder `root` (run/, calib/, w.safetensors, whatever else it holds) as `dest`, with
    the paths run.json records under `root` (its weights file, its images) rewritten to the copies: the run as if it
    had been calibrated in `dest`, so that moving or deleting the copy's files affects the copy alone. Returns dest."""
    shutil.copytree(root, dest)
    manifest = dest / "run" / "run.json"
    text = manifest.read_text()
    manifest.write_text(text.replace(f"{Path(root).resolve()}/", f"{Path(dest).resolve()}/").replace(
        f"{root}/", f"{dest}/"))
    return dest


def folder_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by its relative path: what a shared run must still hold after every test."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}
