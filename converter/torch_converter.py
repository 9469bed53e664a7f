"""PyTorch -> ONNX with torch.onnx (dynamo exporter first, TorchScript exporter as fallback).

Source forms: TorchScript archive, ExportedProgram (.pt2), ``module:factory``
callable (+ state_dict via --weights, loaded weights_only), a whole pickled
nn.Module (only with --trust-remote-code), or an in-memory nn.Module.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from retool.converter.torch_archive import NO_INPUTS, TORCH_SUFFIXES, classify_file, undeclared_inputs_error
from retool.converter.base import Converter, ConvertRequest, ExportResult, SourceModel, merge_specs
from retool.converter.torch_outputs import choose_names, flat_module, flatten_named, hf_output_names, is_flat
from retool.converter.torch_outputs import short_error as _short
from retool.deps import require, version_of
from retool.converter.torch_imports import broken_import_error, import_failure
from retool.errors import ConversionError, RetoolError, TrustRequired, UsageError
from retool.types import TensorSpec

#: Above this size of parameters, ONNX protobuf's 2 GB limit forces external data.
EXTERNAL_DATA_BYTES = 1_900_000_000


class TorchConverter(Converter):
    name = "torch"
    extra = "torch"

    def sniff(self, source: Any) -> str | None:
        if isinstance(source, (str, Path)):
            from retool.converter.core import is_callable_ref

            if is_callable_ref(str(source)):
                return "a Python callable reference (module:factory)"
            p = Path(source)
            if p.is_file():
                kind = classify_file(p)
                if kind:
                    return f"{p.name} is a torch {kind.replace('_', ' ')} archive"
                if p.suffix in TORCH_SUFFIXES:
                    return f"{p.name} has a torch suffix"
            return None
        mod = type(source).__module__
        if mod.startswith("torch") or any(c.__module__.startswith("torch.nn") for c in type(source).__mro__):
            return "an in-memory torch module"
        return None

    def load(self, request: ConvertRequest) -> SourceModel:
        early = undeclared_inputs_error(request)  # before torch's import: seconds sooner
        if early:
            raise early
        torch = require("torch", "torch", "convert PyTorch models")
        src = request.source
        if not isinstance(src, (str, Path)):
            return TorchSource(src, request, kind="module", files=())
        from retool.converter.core import is_callable_ref

        text = str(src)
        if is_callable_ref(text):
            module = _load_factory(text, request)
            return TorchSource(module, request, kind="factory",
                               files=(request.weights,) if request.weights else ())
        path = Path(src)
        if not path.exists():
            raise UsageError(f"{path}: model file not found")
        if path.is_dir():
            raise ConversionError(f"{path}: is a folder, not a PyTorch model file (use --framework tensorflow for a SavedModel)")
        kind = classify_file(path)
        if kind is None:
            raise ConversionError(f"{path}: not a PyTorch model file (not a torch zip archive; "
                                  f"truncated or corrupt?). Re-save it with torch.save/torch.jit.save/torch.export.save")
        try:
            if kind == "torchscript":
                module = torch.jit.load(str(path), map_location="cpu")
            elif kind == "exported_program":
                module = torch.export.load(str(path))
            else:
                module = _load_pickle(torch, path, request)
        except RetoolError:
            raise
        except Exception as exc:
            raise ConversionError(f"{path}: cannot load as a torch {kind.replace('_', ' ')} "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
                                  f"the file may be truncated or corrupt") from None
        return TorchSource(module, request, kind=kind, files=(path,))


def _load_pickle(torch, path: Path, request: ConvertRequest):
    # weights_only first: a state_dict loads safely and tells the user what to do.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as safe_exc:
        if "weights_only" not in str(safe_exc) and "Unsupported global" not in str(safe_exc):
            raise
        if not request.trust_remote_code:
            raise TrustRequired(
                f"{path}: is a pickled Python object (a whole nn.Module); unpickling it runs arbitrary code. "
                f"Re-run with --trust-remote-code if you trust its origin, or export a state_dict and pass "
                f"module:factory with --weights") from None
        from retool.refs import ensure_importable

        ensure_importable()  # the pickle names its classes' modules, like `python -m`
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except ModuleNotFoundError as exc:
            raise UsageError(f"{path}: the pickled model needs module {exc.name!r}, which is not importable; "
                             f"run from the folder that holds it or install it") from None
        except Exception as exc:
            failing = import_failure(exc)
            if failing is None:
                raise
            raise broken_import_error(path, failing, exc, torch.__version__) from None
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, Mapping):
        raise UsageError(f"{path}: holds a state_dict, not a model; pass the model's factory as SOURCE "
                         f"(package.module:factory) and this file as --weights")
    raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a torch nn.Module")


def _load_factory(ref: str, request: ConvertRequest):
    torch = require("torch", "torch")
    from retool.refs import import_ref

    obj = import_ref(ref)
    model = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{ref}: returned {type(model).__name__}, not a torch nn.Module")
    if request.weights:
        try:
            state = torch.load(str(request.weights), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConversionError(f"{request.weights}: cannot load as a state_dict with weights_only=True "
                                  f"({type(exc).__name__}); the file may be corrupt or hold pickled code") from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise UsageError(f"{request.weights}: holds a {type(state).__name__}, not a state_dict; save "
                             f"model.state_dict() and pass that as --weights")
        misfit = _state_dict_misfit(model.state_dict(), state)
        if misfit:
            raise UsageError(f"{request.weights}: does not fit {ref} ({misfit}); pass the factory these weights "
                             f"were trained with, or the matching --weights")
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise UsageError(f"{request.weights}: does not fit {ref}: {str(exc).splitlines()[0][:300]}") from None
    return model


def _state_dict_misfit(expected: Mapping, given: Mapping, show: int = 3) -> str:
    """Missing / unexpected / wrongly shaped keys, the first few of each with counts; "" when it fits."""
    def few(keys) -> str:
        keys = list(keys)
        more = f", … {len(keys) - show} more" if len(keys) > show else ""
        return ", ".join(keys[:show]) + more

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {list(given[k].shape)} vs {list(expected[k].shape)}" for k in expected
              if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es), file vs model: {few(shapes)}")
    return "; ".join(parts)


class TorchSource(SourceModel):
    framework = "torch"

    def __init__(self, module, request: ConvertRequest, kind: str, files):
        import torch

        self.torch = torch
        self.kind = kind
        self.request = request
        self.source_files = tuple(Path(f) for f in files if f)
        self.versions = {"torch": torch.__version__, "onnx": version_of("onnx") or "",
                         "onnxscript": version_of("onnxscript") or ""}
        self.exported = None
        self.program = None
        self.notes: list[str] = []
        if kind == "exported_program":
            from retool.converter.torch_exported import read_program

            self.exported = module
            self.program = read_program(torch, module)
            self.verify_batch_sizes = self.program.verify_batches or None
            self.module = module.module()
        else:
            self.module = module
            if hasattr(module, "eval"):
                module.eval()
        self.input_specs = self._resolve_specs()
        # dynamo exports nn.Modules and ExportedPrograms, never TorchScript: a ScriptModule goes to the TorchScript exporter
        self.scripted = isinstance(self.module, torch.jit.ScriptModule)
        self._flat_needed = False
        self.output_names_source = ""

    # -- input signature -------------------------------------------------
    def _declared_specs(self) -> tuple[TensorSpec, ...]:
        """What the model itself says: ExportedProgram placeholders, or a ``retool_inputs`` attribute."""
        if self.program is not None:
            return self.program.specs
        declared = getattr(self.module, "retool_inputs", None)
        if declared:
            return tuple(TensorSpec.parse(s) if isinstance(s, str) else s for s in declared)
        return ()

    def _resolve_specs(self) -> tuple[TensorSpec, ...]:
        req = self.request
        if self.program is not None:
            return self._program_specs()
        if req.example_inputs:
            from retool.inputs import specs_from_arrays

            given = specs_from_arrays(req.example_inputs)
            user = {s.name: s for s in req.inputs}
            given = tuple(user.get(s.name, s) for s in given)
        else:
            given = req.inputs
        specs = merge_specs(self._declared_specs(), given)
        if not specs:
            raise UsageError(NO_INPUTS.format(label=req.source_label))
        return specs

    def _program_specs(self) -> tuple[TensorSpec, ...]:
        """An ExportedProgram's own shapes win: it was traced at them and its guards refuse others."""
        from retool.converter.torch_exported import check_examples

        req, specs = self.request, self.program.specs
        by = {s.name: s for s in specs}
        for g in req.inputs:
            d = by.get(g.name)
            if d is None:
                raise UsageError(f"--input {g.name}: the program has no input of that name; its inputs are "
                                 f"{', '.join(str(s) for s in specs)}")
            if g.shape and (len(g.shape) != len(d.shape) or any(
                    isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(g.shape, d.shape))):
                raise UsageError(f"--input {g}: the program was exported for {d}; its declared shapes "
                                 f"cannot be changed (re-export it with other dynamic_shapes)")
        if req.example_inputs:
            self.notes += check_examples(req.source_label, self.program, req.example_inputs)
        return specs

    def close(self) -> None:
        import gc

        self.module = self.exported = None
        _release_exporter_state()
        gc.collect()

    # -- running -----------------------------------------------------------
    def _tensors(self, feeds: Mapping[str, np.ndarray]):
        torch = self.torch
        missing = [s.name for s in self.input_specs if s.name not in feeds]
        if missing:
            raise UsageError(f"inputs missing from the feeds: {missing}")
        return tuple(torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.input_specs)

    def _forward(self, args):
        if self.exported is not None:
            from retool.converter.torch_exported import call

            return call(self.torch, self.module, self.exported, args)
        return self.module(*args)

    def _call(self, args):
        pairs, _ = flatten_named(self.torch, self._forward(args))
        return [t for _, t in pairs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self.torch.no_grad():
            outs = self._call(self._tensors(feeds))
        return [o.detach().cpu().numpy() for o in outs]

    # -- export --------------------------------------------------------------
    def _example_args(self):
        from retool.inputs import random_feeds, resize_batch

        # batch 2 for tracing: batch 1 invites specialisation of the batch axis
        batch = 2
        if self.program is not None and self.program.verify_batches:  # a batch the program allows
            batch = 2 if 2 in range(min(self.program.verify_batches), max(self.program.verify_batches) + 1) \
                else self.program.verify_batches[0]
        if self.request.example_inputs:
            feeds = resize_batch(self.request.example_inputs, batch) if (all(
                s.has_dynamic_batch for s in self.input_specs) or self.program is not None) \
                else self.request.example_inputs
        else:
            feeds = random_feeds(self.input_specs, batch=batch, seed=self.request.seed)
        return self._tensors(feeds)

    def _param_bytes(self) -> int:
        try:
            return sum(p.numel() * p.element_size() for p in self.module.parameters()) + sum(
                b.numel() * b.element_size() for b in self.module.buffers())
        except Exception:
            return 0

    def _output_names_for(self, args) -> list[str]:
        """Names from what the model returns (or --output-names); notes whether the exporter needs a flat tuple."""
        with self.torch.no_grad():
            out = self._forward(args)
        pairs, named = flatten_named(self.torch, out)
        # a scripted list is one List value to the exporter, not several outputs
        self._flat_needed = not is_flat(self.torch, out) or (self.scripted and isinstance(out, list))
        found = [n for n, _ in pairs]
        if not named:  # a transformers model run with return_dict=False can still say its names
            found, named = hf_output_names(self.torch, self.module, args, found)
        names, self.output_names_source = choose_names(
            found, named, (self.request.options or {}).get("output_names"),
            [s.name for s in self.input_specs], self.request.source_label)
        if isinstance(named, str) and self.output_names_source == "model":  # HF_NAMED or a traced model's class
            self.output_names_source = named
        return names

    def export(self, path: Path, opset: int | None) -> ExportResult:
        args = self._example_args()
        input_names = [s.name for s in self.input_specs]
        output_names = self._output_names_for(args)
        large = self._param_bytes() > EXTERNAL_DATA_BYTES
        dyn_axes = {}
        for s in self.input_specs:
            axes = {i: (d if isinstance(d, str) else f"{s.name}_dim{i}") for i, d in enumerate(s.shape)
                    if not isinstance(d, int)}
            if axes:
                dyn_axes[s.name] = axes
        errors = []
        warn_list: list[str] = list(self.notes)
        target = self.exported if self.exported is not None else (
            flat_module(self.torch, self.module) if self._flat_needed else self.module)
        for exporter in ("dynamo", "torchscript"):
            if exporter == "torchscript" and self.kind == "exported_program":
                break
            if exporter == "dynamo" and self.scripted:
                errors.append("not tried: the source is TorchScript (a ScriptModule), which only the TorchScript "
                              "exporter takes")
                continue
            try:
                # exporters print graphs and progress on stdout, which belongs to our report
                with warnings.catch_warnings(record=True) as caught, _quiet_stdout():
                    warnings.simplefilter("always")
                    if exporter == "dynamo":
                        self._export_dynamo(target, args, path, opset, input_names, output_names, dyn_axes, large)
                    else:
                        self._export_torchscript(target, args, path, opset, input_names, output_names, dyn_axes,
                                                 large)
                warn_list += [str(w.message).splitlines()[0][:200] for w in caught
                              if issubclass(w.category, UserWarning)][:5]
                if exporter != "dynamo" and not self.scripted:
                    warn_list.insert(0, "dynamo exporter failed; used the TorchScript exporter: " + errors[0])
                pinned = self.program.pinned_note() if self.program is not None else None
                if pinned:
                    warn_list.insert(0, pinned)
                return ExportResult(f"torch.onnx.export({exporter})",
                                    {"exporter": exporter, "external_data": large,
                                     "output_names": output_names, "output_names_source": self.output_names_source,
                                     **self._batch_params(),
                                     "dynamic_axes": {k: {str(i): n for i, n in v.items()} for k, v in dyn_axes.items()}},
                                    tuple(warn_list))
            except Exception as exc:
                errors.append(_short(exc))
                for f in path.parent.glob(path.name + "*"):
                    f.unlink()
        if self.scripted and ("aten::dict" in errors[-1] or "DictConstruct" in errors[-1]):
            from retool.converter.torch_script_outputs import DICT_HINT

            errors[-1] += f" ({DICT_HINT})"
        raise ConversionError(f"{self.request.source_label}: torch.onnx could not export the model: "
                              + " | ".join(f"{n}: {e}" for n, e in zip(("dynamo", "torchscript"), errors)))

    def _batch_params(self) -> dict:
        if self.program is None:
            return {}
        return {"static_batch": self.program.static_batch is not None,
                "verified_batch_sizes": list(self.program.verify_batches),
                "batch_range": list(self.program.batch_range) if self.program.batch_range else None,
                "call_keywords": list(self.program.keywords),
                "fixed_axes": {n: {str(a): v for a, v in ax.items()} for n, ax in (self.program.fixed_axes or {}).items()}}

    def _export_dynamo(self, target, args, path, opset, input_names, output_names, dyn_axes, large):
        import logging

        torch = self.torch
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        dynamic_shapes = None
        if dyn_axes and self.exported is None:
            Dim = torch.export.Dim
            dims: dict[str, Any] = {}
            shapes = []
            for s in self.input_specs:
                axes = dyn_axes.get(s.name, {})
                shapes.append({i: dims.setdefault(n, Dim(_ident(n), min=1)) if i == 0 else
                               dims.setdefault(n, Dim.DYNAMIC) for i, n in axes.items()} or None)
            dynamic_shapes = tuple(shapes)
            if getattr(target, "takes_varargs", False):  # torch.export sees (*args) as one tuple argument
                dynamic_shapes = (dynamic_shapes,)
        kwargs = dict(f=str(path), input_names=input_names, output_names=output_names, dynamo=True,
                      external_data=large, optimize=True, verbose=False)
        if opset:
            kwargs["opset_version"] = opset
        if dynamic_shapes is not None:
            kwargs["dynamic_shapes"] = dynamic_shapes
        if self.exported is not None:
            torch.onnx.export(target, (), **kwargs)
        else:
            torch.onnx.export(target, args, **kwargs)

    def _export_torchscript(self, target, args, path, opset, input_names, output_names, dyn_axes, large):
        torch = self.torch
        if getattr(target, "takes_varargs", False):
            # the exporter's own tracer refuses a ScriptModule inside a Python module; torch.jit.trace does not
            target = torch.jit.trace(target, args, strict=False)
            from retool.converter.torch_script_outputs import flatten_script_dicts

            target = flatten_script_dicts(torch, target)  # a scripted forward's dict becomes its tensors
        torch.onnx.export(target, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dyn_axes or None, opset_version=opset or 17, dynamo=False,
                          do_constant_folding=True)
        if large:
            import onnx

            m = onnx.load(str(path))
            onnx.save_model(m, str(path), save_as_external_data=True, location=path.name + ".data")


def _release_exporter_state() -> None:
    """onnxscript's module-level rewrite rules keep the last graph they matched, and with it
    every weight of the exported model (onnxscript 0.7). Drop those references so the source
    weights are freed before onnxruntime loads the ONNX copy: one copy in memory, not two."""
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher  # private: best effort
    except ImportError:
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_current_node", "_match", "_tracer"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)


@contextlib.contextmanager
def _quiet_stdout():
    """Send Python- and C++-level stdout to stderr: stdout carries our table or JSON."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real fd 1 (embedded interpreters)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
        return
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _ident(name: str) -> str:
    import re

    out = re.sub(r"\W", "_", name)
    return out if out and not out[0].isdigit() else f"d_{out}"
