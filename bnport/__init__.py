"""bnport: recalibrate BatchNorm statistics, fold BatchNorm exactly, export verified ONNX and score it.

The library works without the command line; `bnport.cli` is a thin layer over it. Heavy dependencies
(onnxruntime, onnxsim, matplotlib) are imported inside the functions that need them.
"""
__version__ = "0.1.0"

from bnport.errors import BnportError

__all__ = ["BnportError", "__version__"]
