"""Encoders from a ``save_pretrained`` folder: feature extraction and classification.

The model is wrapped so that it takes its inputs positionally (what torch.onnx exports)
and returns its ``ModelOutput`` fields as a tuple, whose keys become the ONNX output names.
"""
from __future__ import annotations

import inspect
from typing import Mapping, Sequence

import numpy as np

from retool.converter.torch_converter import TorchSource
from retool.types import TensorSpec


def _wrapper(torch, model, names: Sequence[str], keys: Sequence[str]):
    keys = tuple(keys)

    def pick(out):
        return tuple(out[k] for k in keys)

    # explicit signatures: torch.export matches dynamic shapes to named parameters
    if tuple(names) == ("pixel_values",):
        class Image(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                return pick(self.model(pixel_values=pixel_values, return_dict=True))
        return Image()
    if "token_type_ids" in names:
        class Text3(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return pick(self.model(input_ids=input_ids, attention_mask=attention_mask,
                                       token_type_ids=token_type_ids, return_dict=True))
        return Text3()

    class Text2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return pick(self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True))
    return Text2()


def declared_inputs(model, task: str) -> tuple[TensorSpec, ...]:
    cfg = model.config
    if task == "image-classification":
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return (TensorSpec("pixel_values", "float32", ("batch", getattr(cfg, "num_channels", 3), size, size)),)
    params = inspect.signature(model.forward).parameters
    specs = [TensorSpec("input_ids", "int64", ("batch", "sequence")),
             TensorSpec("attention_mask", "int64", ("batch", "sequence"))]
    if "token_type_ids" in params and getattr(cfg, "type_vocab_size", 0):
        specs.append(TensorSpec("token_type_ids", "int64", ("batch", "sequence")))
    return tuple(specs)


def valid_int_feeds(feeds: dict, config, seed: int) -> dict:
    """Token ids below vocab_size, 0/1 masks with right padding, token types below type_vocab_size."""
    rng = np.random.default_rng(seed + 77)
    out = dict(feeds)
    for name, a in feeds.items():
        if a.dtype.kind not in "iu" or a.ndim != 2:
            continue
        b, s = a.shape
        if name == "attention_mask":
            lengths = rng.integers(max(1, s // 2), s + 1, size=b)
            out[name] = (np.arange(s)[None, :] < lengths[:, None]).astype(a.dtype)
        elif name == "token_type_ids":
            out[name] = rng.integers(0, max(1, int(getattr(config, "type_vocab_size", 1) or 1)), size=a.shape).astype(a.dtype)
        elif name == "input_ids":
            out[name] = rng.integers(0, int(config.vocab_size), size=a.shape).astype(a.dtype)
    return out


class EncoderSource(TorchSource):
    framework = "hf"

    def __init__(self, model, folder, task: str, request):
        import torch

        self.task, self.folder, self.config = task, folder, model.config
        specs = declared_inputs(model, task)
        probe = valid_int_feeds(_random(specs), model.config, request.seed)
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in probe.items()}, return_dict=True)
        self.output_keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        wrapper = _wrapper(torch, model, [s.name for s in specs], self.output_keys)
        wrapper.retool_inputs = specs
        super().__init__(wrapper, request, kind="hf", files=folder.safetensors or folder.pickles)
        self.source_files = tuple(folder.safetensors or folder.pickles) + (folder.path / "config.json",)
        from retool.deps import version_of

        self.versions = {**self.versions, "transformers": version_of("transformers") or ""}

    def input_ranges(self) -> dict:
        """input_ids < vocab_size, token_type_ids < type_vocab_size, a mask of ones (for validate's random feeds)."""
        from retool.input_ranges import hf_config_ranges

        return hf_config_ranges(self.config, [s.name for s in self.input_specs])

    def _output_names_for(self, args) -> list[str]:
        return list(self.output_keys)

    def export(self, path, opset):
        from retool.converter.hf.dims import rename_dims

        result = super().export(path, opset)
        rename_dims(path, {s.name: s.shape for s in self.input_specs})
        return result

    def verification_feeds(self, specs, examples: Mapping | None, seed: int) -> list[dict]:
        from retool.inputs import verification_feeds

        feeds = verification_feeds(specs, examples, seed=seed)
        return feeds if examples else [valid_int_feeds(f, self.config, seed + i) for i, f in enumerate(feeds)]

    def _example_args(self):
        from retool.inputs import random_feeds

        if self.request.example_inputs:
            return super()._example_args()
        feeds = valid_int_feeds(random_feeds(self.input_specs, batch=2, seed=self.request.seed),
                                self.config, self.request.seed)
        return self._tensors(feeds)


def _random(specs):
    from retool.inputs import random_feeds

    return random_feeds(specs, batch=2, seed=0)
