"""quanta's error types: each names the problem and, where there is one, the layer."""

from __future__ import annotations


class QuantaError(Exception):
    """Base class for every error quanta raises on purpose."""


class QuantaWarning(UserWarning):
    """Something the user should know about the quantized model (e.g. little of it runs int8)."""


class CalibrationError(QuantaError, ValueError):
    """Calibration data is unusable (empty, NaN/Inf) or a layer was never calibrated."""


class UnsupportedModelError(QuantaError, ValueError):
    """The model or its example inputs cannot be prepared as given."""


class QuantizedInputError(QuantaError, TypeError):
    """A quantized model received an input of the wrong dtype or rank."""


class NonFiniteInputError(ValueError):
    """A kernel met NaN or Inf where it quantizes a float tensor. The layer turns it into a
    ``QuantizedInputError`` naming itself or, with ``QuantConfig(nonfinite="propagate")``, into
    a float computation that passes the values on as the float model would."""


class FormatError(QuantaError, ValueError):
    """A saved quanta file is truncated, corrupted, from a newer format, or does not match."""
