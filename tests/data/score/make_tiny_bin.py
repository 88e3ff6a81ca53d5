"""Regenerates tiny.bin: an insightface-style verification pack (pickle of (bins, issame_list), JPEG bytes) of 40
pairs of 112x112 synthetic identity images, used by the README's worked example and the tests that run it.

Usage: python tests/data/score/make_tiny_bin.py
"""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parents[1]))

from benchdata import write_bin_pack  # noqa: E402

if __name__ == "__main__":
    write_bin_pack(here / "tiny.bin", 40, ext=".jpg")
