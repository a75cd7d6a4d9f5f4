"""Finding accuracy loss: per-site comparison with float (``compare``), per-site sensitivity
(``sensitivity``), the report and its HTML page."""

from quanta.debug.compare import CompareResult, compare
from quanta.debug.sensitivity import SensitivityResult, sensitivity

__all__ = ["CompareResult", "SensitivityResult", "compare", "sensitivity"]
