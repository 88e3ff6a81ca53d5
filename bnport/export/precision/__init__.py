"""Lower-precision files (INT8 for CPUs, FP16 for GPUs) made from a verified float32 ONNX file, behind their own gate:
INT8 by onnxruntime's static QDQ quantization (`int8`), FP16 by its float16 converter (`fp16`), judged against the
float32 file by row cosine (`gate`), made, stamped and written as gated files are (`make`); `common` checks what they
take. `PrecisionSettings` (bnport.export.settings) says how."""
from bnport.export.precision.fp16 import convert_fp16, cpu_float32_ops
from bnport.export.precision.gate import DEFAULT_MIN_COS, PrecisionParity, check_precision_parity
from bnport.export.precision.int8 import ENTROPY_BINS, quantize_int8
from bnport.export.precision.make import (LowerFile, PrecisionResult, load_precision_images, lower_precision_file,
                                          make_precision, stamp_precision_metadata, write_precision_model)
from bnport.export.settings import CALIBRATION_METHODS, PRECISIONS

__all__ = ["CALIBRATION_METHODS", "DEFAULT_MIN_COS", "ENTROPY_BINS", "PRECISIONS", "LowerFile", "PrecisionParity",
           "PrecisionResult", "check_precision_parity", "convert_fp16", "cpu_float32_ops", "load_precision_images",
           "lower_precision_file", "make_precision", "quantize_int8", "stamp_precision_metadata",
           "write_precision_model"]
