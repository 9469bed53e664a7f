"""Parity of an exported ONNX model with its source: run the source on the verification inputs, then
compare onnxruntime's outputs with them. Below both ``base.SourceModel`` (whose ``reference``/``compare``
call it) and ``core.convert`` (which drives them)."""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Mapping

from retool.errors import ConversionError, RetoolError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from retool.converter.base import ConvertRequest, SourceModel
    from retool.types import CheckResult, ModelArtifact

#: one-line error text; the converter keeps its own length limit
first_line_of = partial(first_line, limit=500, with_type=True)


def index_hint(exc, specs, request: "ConvertRequest") -> str:
    """What an index error in the source or in onnxruntime says about the inputs' value ranges."""
    from retool.input_ranges import index_hint as hint

    return hint(f"{type(exc).__name__}: {exc}", specs, request.example_inputs)


def shapes(feeds) -> dict:
    return {k: list(v.shape) for k, v in feeds.items()}


def reference_outputs(model: "SourceModel", art: "ModelArtifact", request: "ConvertRequest"):
    """The verification inputs (two batch sizes when the batch is dynamic) and the source's outputs."""
    feeds_list = model.verification_feeds(art.inputs, request.example_inputs, request.seed)
    refs = []
    for feeds in feeds_list:
        try:
            refs.append(model.run(model.reference_feeds(feeds)))
        except RetoolError:
            raise
        except Exception as exc:
            raise ConversionError(f"{request.source_label}: the source model failed on inputs "
                                  f"{shapes(feeds)}: {first_line_of(exc)}"
                                  f"{index_hint(exc, art.inputs, request)}") from exc
    return feeds_list, refs


def compare_with_onnxruntime(sess, feeds_list, refs, art: "ModelArtifact", request: "ConvertRequest",
                             tol, custom: Mapping | None = None) -> list["CheckResult"]:
    from retool.runtime import run_session
    from retool.validators.parity import compare_outputs

    names = [o.name for o in art.outputs]
    checks = []
    for feeds, ref in zip(feeds_list, refs):
        first = next(iter(feeds.values()), None)
        label = f"batch{first.shape[0]}" if len(feeds_list) > 1 and first is not None and first.ndim else ""
        try:
            cand = run_session(sess, feeds)
        except Exception as exc:
            raise ConversionError(f"{request.source_label}: onnxruntime failed on inputs "
                                  f"{shapes(feeds)}: {first_line_of(exc)}"
                                  f"{index_hint(exc, art.inputs, request)}") from exc
        if not custom or len(ref) != len(cand):
            checks += compare_outputs(names, ref, cand, tol, label)
            continue
        for name, r, c in zip(names, ref, cand):  # one output at a time, so each keeps its own check
            checks += [custom[name](name, r, c, label)] if name in custom else compare_outputs([name], [r], [c], tol, label)
    return checks
