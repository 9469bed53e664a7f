"""What a framework converter provides. One module per framework implements it."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from retool.types import TensorSpec


@dataclass(frozen=True)
class ConvertRequest:
    source: Any  # a path, a "module:attr" string, or an in-memory model (Python API)
    output: Path
    framework: str = "auto"
    weights: Path | None = None
    inputs: tuple[TensorSpec, ...] = ()
    example_inputs: Mapping[str, np.ndarray] | None = None
    opset: int | None = None
    trust_remote_code: bool = False
    #: Framework-specific options: signature, output_names, inputs_as_nchw, static_batch ...
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __hash__(self):  # holds dicts and arrays; identity is enough
        return id(self)

    @property
    def source_label(self) -> str:
        return str(self.source) if isinstance(self.source, (str, Path)) else type(self.source).__name__


@dataclass(frozen=True)
class ExportResult:
    tool: str  # what produced the ONNX file, e.g. "torch.onnx.export(dynamo)"
    params: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reference:
    """What the source computed for parity, taken before the source is freed."""

    feeds: list  # the input sets (dicts of arrays) it ran on; empty where inputs are not plain feeds
    outputs: Any  # its outputs per input set (a source's own form where it overrides compare)
    extra: tuple = ()  # further checks of the source's own (e.g. intermediate tensors)
    custom: Mapping[str, Any] = field(default_factory=dict)  # per-output parity functions


class SourceModel(abc.ABC):
    """A loaded source model: it can export itself to ONNX and run for parity."""

    framework: str = ""
    #: Input signature after merging what the user said and what the model declares.
    input_specs: tuple[TensorSpec, ...] = ()
    #: Files the model came from (hashed into the provenance).
    source_files: tuple[Path, ...] = ()
    versions: Mapping[str, str] = {}
    #: Batch sizes to check parity at when the batch is dynamic; None: retool.inputs.VERIFY_BATCH_SIZES.
    verify_batch_sizes: tuple[int, ...] | None = None

    @abc.abstractmethod
    def export(self, path: Path, opset: int | None) -> ExportResult:
        """Write ONNX to ``path`` (external data, if any, beside it)."""

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The source framework's outputs for ``feeds`` (ONNX input names), in ONNX output order."""

    def reference_feeds(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Map ONNX-side inputs to what the source model expects (e.g. NCHW -> NHWC)."""
        return feeds

    def verification_feeds(self, specs: Sequence[TensorSpec], examples: Mapping[str, np.ndarray] | None,
                           seed: int) -> list[dict]:
        """The input sets parity runs on; a source whose inputs have valid ranges (token ids) overrides it."""
        from retool.inputs import VERIFY_BATCH_SIZES, verification_feeds

        # a source may allow fewer batch sizes than the defaults (an ExportedProgram's range constraints)
        sizes = self.verify_batch_sizes or VERIFY_BATCH_SIZES
        return verification_feeds(specs, examples, seed=seed, batch_sizes=sizes)

    def reference(self, art, request: "ConvertRequest", tol) -> "Reference":
        """Run the source for parity, before it is freed; ``compare`` gets what this returns."""
        from retool.converter.source_parity import reference_outputs

        feeds_list, refs = reference_outputs(self, art, request)
        return Reference(feeds_list, refs, tuple(self.extra_checks(feeds_list, tol)), dict(self.custom_parity()))

    def compare(self, sess, ref: "Reference", art, request: "ConvertRequest", tol) -> list:
        """Parity CheckResults of the ONNX session against ``reference``'s result."""
        from retool.converter.source_parity import compare_with_onnxruntime

        return compare_with_onnxruntime(sess, ref.feeds, ref.outputs, art, request, tol, ref.custom) + list(ref.extra)

    #: Extra report data a source adds (e.g. a decoder's generation parity).
    report_data: Mapping[str, Any] = {}

    def custom_parity(self) -> Mapping[str, Any]:
        """Outputs that element-wise parity cannot judge, each with ``f(name, ref, cand, label) -> CheckResult``."""
        return {}

    def extra_checks(self, feeds_list, tol) -> list:
        """Further parity checks of the source's own (e.g. intermediate tensors), run before close()."""
        return []

    def close(self) -> None:
        pass


class Converter(abc.ABC):
    """Registry entry for one framework. Must not import the framework at module import."""

    name: str = ""
    extra: str = ""

    @abc.abstractmethod
    def sniff(self, source: Any) -> str | None:
        """A short reason if ``source`` looks like this framework's model, else None. Cheap; no heavy imports."""

    @abc.abstractmethod
    def load(self, request: ConvertRequest) -> SourceModel:
        """Load the model; raise UsageError/ConversionError/TrustRequired/MissingDependency on bad input."""


def merge_specs(declared: Sequence[TensorSpec], given: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """User-given specs override declared ones by name; unnamed order is kept."""
    if not given:
        return tuple(declared)
    if not declared:
        return tuple(given)
    by_name = {s.name: s for s in given}
    if not set(by_name) & {s.name for s in declared} and len(given) == len(declared):
        return tuple(given)  # positional override with the user's names
    return tuple(by_name.get(s.name, s) for s in declared)
