"""Framework -> ONNX converters, verified against the source framework by default."""
from retool.converter.core import convert, detect_framework  # noqa: F401
