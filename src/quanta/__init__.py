"""quanta: real int8 models from any nn.Module, for CPU and edge inference."""

from quanta import debug, ptq
from quanta.api import calibrate, convert, prepare, quantize
from quanta.config import Override, QuantConfig, QuantSpec
from quanta.debug.report import Report, report, runtime_status
from quanta.debug.sqnr import layer_sqnr
from quanta.dynamic import quantize_dynamic
from quanta.errors import (
    CalibrationError,
    FormatError,
    QuantaError,
    QuantaWarning,
    QuantizedInputError,
    UnsupportedModelError,
)
from quanta.io.executorch_export import export_executorch
from quanta.io.load import load
from quanta.io.onnx_export import export_onnx
from quanta.io.save import save
from quanta.qat import freeze, prepare_qat
from quanta.qtensor import QTensor
from quanta.target import target_of

__version__ = "0.1.0"

__all__ = [
    "CalibrationError", "FormatError", "Override", "QTensor", "QuantConfig", "QuantSpec",
    "QuantaError", "QuantaWarning", "QuantizedInputError", "UnsupportedModelError", "calibrate", "convert",
    "freeze", "prepare", "prepare_qat", "quantize", "quantize_dynamic",
    "save", "load", "export_onnx", "export_executorch", "Report", "report", "layer_sqnr", "runtime_status",
    "target_of", "debug", "ptq",
]
