"""An ONNX file as a source: checked, optionally moved to another opset, and copied.

Lets a pipeline start from a model someone already exported.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from retool.converter.base import Converter, ConvertRequest, ExportResult, SourceModel
from retool.deps import version_of
from retool.errors import ConversionError


class OnnxConverter(Converter):
    name = "onnx"
    extra = ""

    def sniff(self, source: Any) -> str | None:
        if isinstance(source, (str, Path)) and Path(source).is_file() and Path(source).suffix == ".onnx":
            return f"{Path(source).name} has the .onnx suffix"
        return None

    def load(self, request: ConvertRequest) -> SourceModel:
        return OnnxSource(Path(request.source), request)


class OnnxSource(SourceModel):
    framework = "onnx"

    def __init__(self, path: Path, request: ConvertRequest):
        from retool.fsutil import load_onnx_header
        from retool.onnx_info import io_specs

        try:
            header = load_onnx_header(path)
        except Exception as exc:
            # not "convert it first": this *is* convert, and the file is damaged or is not ONNX
            why = str(exc).split(";")[0]
            raise ConversionError(f"{why}: the file is damaged, truncated or not ONNX; export it again from "
                                  f"its framework, or give that source model to 'retool convert'") from None
        self.path = path
        self.request = request
        self.input_specs = io_specs(header)[0]
        self.source_files = (path,)
        self.versions = {"onnx": version_of("onnx") or "", "onnxruntime": version_of("onnxruntime") or ""}
        self._sess = None

    def export(self, path: Path, opset: int | None) -> ExportResult:
        import onnx

        if opset is None:
            from retool.fsutil import external_data_files

            shutil.copyfile(self.path, path)
            for name in external_data_files(self.path):
                shutil.copyfile(self.path.parent / name, path.parent / name)
            return ExportResult("copy", {"identical_to_source": True})
        model = onnx.load(str(self.path))
        converted = onnx.version_converter.convert_version(model, int(opset))
        onnx.save_model(converted, str(path))
        return ExportResult("onnx.version_converter", {"opset": opset})

    def close(self) -> None:
        self._sess = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from retool.runtime import make_session, run_session

        if self._sess is None:
            self._sess = make_session(self.path)
        return run_session(self._sess, feeds)
