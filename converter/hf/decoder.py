"""Causal LMs from a ``save_pretrained`` folder, exported with their KV cache as plain tensors.

``torch.onnx.export(dynamo=True)`` cannot take transformers' ``DynamicCache`` (it is not a
tensor), so a wrapper takes ``forward(input_ids, attention_mask, position_ids, *past)``,
rebuilds the cache inside and returns ``(logits, *present)``. ``position_ids`` is an input
because GPT-2's absolute positions are wrong for left-padded rows without it.
Sliding-window layers (Mistral, Gemma 2/3) keep their whole past too; the mask applies the window.
Parity is generation parity (validators/generation.py), not one forward pass.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Mapping

import numpy as np

from retool.converter.base import ExportResult, SourceModel
from retool.errors import ConversionError, first_line
from retool.types import TensorSpec
from retool.validators.generation import (DEFAULT_NEW_TOKENS, CacheLayout, fp32_parity, make_prompts, past_names,
                                          present_names, reference_run)

#: Axis names of the cache graph (what Optimum and onnxruntime-genai use in spirit).
DIMS = {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "total_sequence"),
        "position_ids": ("batch", "sequence"), "logits": ("batch", "sequence", None)}
PAST_DIMS = ("batch", None, "past_sequence", None)
PRESENT_DIMS = ("batch", None, "total_sequence", None)


def cache_argument(model) -> str:
    """transformers 5 renamed the forward argument ``past_key_values`` to ``cache``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _make_cache(DynamicCache, pairs):
    """A cache whose layers all keep the whole past (plain ``DynamicLayer``), sliding-window layers too.

    Built from the config, transformers 5 gives sliding layers a ``DynamicSlidingWindowLayer`` that keeps
    only the last window - 1 tokens and counts the tokens it has seen; rebuilt from tensors at every step it
    counts only those it holds, so the mask reads the 2D attention mask at the wrong positions and a
    left-padded row goes wrong once the past outgrows the window. With the whole past in the cache the
    mask functions still apply the window (``sliding_window_overlay`` from the config), from the true
    positions, and ``present`` is the whole past, as the full-attention layers' is."""
    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers 4.x
        return DynamicCache.from_legacy_cache(tuple(pairs))
    return DynamicCache(pairs)


def _flat_cache(cache) -> list:
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for k, v in zip(cache.key_cache, cache.value_cache) for t in (k, v)]  # transformers 4.x


def _present(out):
    for field in ("cache", "past_key_values"):
        value = getattr(out, field, None)
        if value is not None:
            return value
    raise ValueError("the model returned no cache (use_cache=True was ignored)")


def sliding_window(config) -> int | None:
    """The attention window of the sliding layers, None when every layer attends to the whole past."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def make_wrapper(torch, model, layers: int):
    from transformers import DynamicCache

    arg = cache_argument(model)

    class CacheWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            cache = _make_cache(DynamicCache, pairs)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, return_dict=True, **{arg: cache})
            return (out.logits, *_flat_cache(_present(out)))
    return CacheWrapper()


def _no_kv_cache(model, why: str) -> ConversionError:
    arch = type(model).__name__
    return ConversionError(f"{arch}: its decoding state is not a key/value cache ({why}); retool exports "
                           f"text-generation models with a KV cache (Llama, GPT-2, Qwen2, Phi-3 ...), so {arch} "
                           f"cannot be converted yet")


def probe_layout(torch, model) -> CacheLayout:
    """Layers, KV heads and head size from one forward pass (configs name them differently).

    A model whose state is not a key/value cache (Mamba's recurrent state, linear attention) is refused."""
    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    if not {"cache", "past_key_values"} & set(params):
        raise _no_kv_cache(model, "its forward takes no past_key_values")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True, return_dict=True,
                        **{cache_argument(model): DynamicCache(config=model.config)})
        flat = _flat_cache(_present(out))
    except (AttributeError, TypeError, ValueError) as exc:
        raise _no_kv_cache(model, first_line(exc, 160, with_type=True)) from None
    if not flat or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in flat):
        raise _no_kv_cache(model, "its cache layers hold no (batch, heads, sequence, head_dim) tensors")
    k = flat[0]
    return CacheLayout(len(flat) // 2, int(k.shape[1]), int(k.shape[3]), int(out.logits.shape[-1]),
                       str(k.dtype).replace("torch.", ""))


def fusion_differs(plain: Path, fused: Path, seed: int, n_new: int = 4) -> str | None:
    """Why the fused graph is not the plain export's function (a batch of two and a left-padded batch, decoded
    with the cache by both), or None. A rewrite that matched a pattern it misread is dropped here."""
    from retool.runtime import make_session
    from retool.validators.generation import cases, decode, layout_from_session, make_prompts, ort_step

    a, b = make_session(plain, threads=1), make_session(fused, threads=1)
    layout = layout_from_session(a)
    prompts = make_prompts(layout.vocab, seed)
    for name, ids, mask, _ in cases(prompts)[len(prompts):]:
        x, y = decode(ort_step(a), layout, ids, mask, n_new), decode(ort_step(b), layout, ids, mask, n_new)
        diff = float(np.max(np.abs(x["logits"] - y["logits"])))
        if not np.array_equal(x["tokens"], y["tokens"]) or diff > 1e-4:
            return f"the fused graph differs from the export ({name}: max logit diff {diff:.3g})"
    return None


class DecoderSource(SourceModel):
    framework = "hf"

    def __init__(self, model, folder, request):
        import torch

        from retool.deps import version_of

        self.torch, self.model, self.folder, self.request = torch, model, folder, request
        self.layout = probe_layout(torch, model)
        self.wrapper = make_wrapper(torch, model, self.layout.layers).eval()
        L = self.layout
        self.input_specs = (TensorSpec("input_ids", "int64", DIMS["input_ids"]),
                            TensorSpec("attention_mask", "int64", DIMS["attention_mask"]),
                            TensorSpec("position_ids", "int64", DIMS["position_ids"])) + tuple(
            TensorSpec(n, L.dtype, ("batch", L.kv_heads, "past_sequence", L.head_dim)) for n in past_names(L.layers))
        self.source_files = tuple(folder.safetensors or folder.pickles) + (Path(folder.path) / "config.json",)
        self.versions = {"torch": torch.__version__, "transformers": version_of("transformers") or "",
                         "onnx": version_of("onnx") or "", "onnxscript": version_of("onnxscript") or ""}
        self.new_tokens = int(request.options.get("new_tokens") or DEFAULT_NEW_TOKENS)
        self.report_data = {}

    # -- running -----------------------------------------------------------
    def step(self, ids, mask, pos, past):
        torch = self.torch
        with torch.no_grad():
            out = self.wrapper(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (ids, mask, pos, *past)))
        return out[0].numpy(), [t.numpy() for t in out[1:]]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        past = [feeds[n] for n in past_names(self.layout.layers)]
        logits, present = self.step(feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"], past)
        return [logits, *present]

    # -- export --------------------------------------------------------------
    def export(self, path: Path, opset: int | None) -> ExportResult:
        import logging
        import warnings

        from retool.converter.hf.dims import rename_dims
        from retool.converter.torch_converter import _quiet_stdout

        torch, L = self.torch, self.layout
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # batch 2, sequence 3, past 4: no axis of size 0 or 1 for the tracer to specialise
        b, s, p = 2, 3, 4
        g = torch.Generator().manual_seed(self.request.seed)
        args = (torch.randint(0, L.vocab, (b, s), generator=g), torch.ones((b, p + s), dtype=torch.long),
                torch.arange(p, p + s).expand(b, s).contiguous(),
                *(torch.randn((b, L.kv_heads, p, L.head_dim), generator=g) for _ in range(2 * L.layers)))
        D = torch.export.Dim.DYNAMIC
        dyn = {"input_ids": {0: D, 1: D}, "attention_mask": {0: D, 1: D}, "position_ids": {0: D, 1: D},
               "past": tuple({0: D, 2: D} for _ in range(2 * L.layers))}
        outputs = ["logits"] + present_names(L.layers)
        from retool.converter.torch_converter import EXTERNAL_DATA_BYTES

        large = sum(t.numel() * t.element_size() for t in self.model.state_dict().values()) > EXTERNAL_DATA_BYTES
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            torch.onnx.export(self.wrapper, args, str(path), input_names=[s.name for s in self.input_specs],
                              output_names=outputs, dynamic_shapes=dyn, dynamo=True,
                              opset_version=max(18, opset or 18), external_data=large, optimize=True,
                              verbose=False)
        dims = {k: v for k, v in DIMS.items()}
        dims.update({n: PAST_DIMS for n in past_names(L.layers)})
        dims.update({n: PRESENT_DIMS for n in present_names(L.layers)})
        rename_dims(path, {k: v for k, v in dims.items() if not k.startswith("present") and k != "logits"},
                    {k: v for k, v in dims.items() if k.startswith("present") or k == "logits"})
        fusion, warns = self._fuse(path)
        tool = "torch.onnx.export(dynamo, KV-cache wrapper)" + (", retool decoder fusion" if fusion.get("applied") else "")
        return ExportResult(tool, {"exporter": "dynamo", "task": "text-generation", "external_data": large,
                                   "cache_argument": cache_argument(self.model), "layers": L.layers, "kv_heads":
                                   L.kv_heads, "head_dim": L.head_dim, "sliding_window":
                                   sliding_window(self.model.config), "fusion": fusion}, warns)

    def _fuse(self, path: Path) -> tuple[dict, tuple]:
        """The export rewritten to onnxruntime's fused contrib ops (optimizers/decoder_fusion.py), here so that
        the generation parity below judges the fused graph against torch; ``fuse: false`` keeps the export."""
        if str(self.request.options.get("fuse", True)).lower() in ("false", "0", "no", "off"):
            self.fusion = {"applied": False, "skipped": {"all": "option fuse=false"}}
            return self.fusion, ()
        from retool.optimizers.decoder_fusion import fuse_file

        L, cfg = self.layout, self.model.config
        text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        positions = int(getattr(text, "max_position_embeddings", 0) or 4096)
        import shutil

        from retool.fsutil import external_data_files

        keep = path.parent / "unfused"  # the staging folder: dropped with it
        keep.mkdir(exist_ok=True)
        files = [path.name, *external_data_files(path)]
        for f in files:
            shutil.copy2(path.parent / f, keep / f)
        try:
            info = fuse_file(path, path, layers=L.layers, kv_heads=L.kv_heads, head_dim=L.head_dim,
                             max_positions=positions, sliding_window=sliding_window(cfg))
            differs = fusion_differs(keep / path.name, path, self.request.seed)
            if differs:
                raise ValueError(differs)
        except Exception as exc:  # a rewrite problem leaves the plain export, which parity then checks
            for f in files:
                shutil.copy2(keep / f, path.parent / f)
            self.fusion = {"applied": False, "skipped": {"all": first_line(exc, 200, with_type=True)}}
            return self.fusion, (f"decoder fusion not applied ({self.fusion['skipped']['all']})",)
        info["applied"] = info["nodes_after"] < info["nodes_before"]
        self.fusion = info
        why = "; ".join(f"{k}: {v}" for k, v in info["skipped"].items())
        return info, ((f"decoder fusion left parts unfused ({why})",) if why else ())

    # -- generation parity -------------------------------------------------
    def _prompts(self):
        return make_prompts(self.layout.vocab, self.request.seed)

    def reference(self, art, request, tol):
        from retool.converter.base import Reference

        prompts = self._prompts()
        return Reference([], (prompts, reference_run(self.step, self.layout, prompts, self.new_tokens)))

    def compare(self, sess, ref, art, request, tol) -> list:
        from retool.validators.generation import ort_step

        prompts, refs = ref.outputs
        max_diff = tol.atol if tol.atol is not None else 1e-4
        checks, data = fp32_parity(ort_step(sess), self.layout, prompts, refs, self.new_tokens, max_diff)
        self.report_data = {"task": "text-generation", "generation": data, "fusion": getattr(self, "fusion", None)}
        return checks

    def close(self) -> None:
        import gc

        from retool.converter.torch_converter import _release_exporter_state

        self.model = self.wrapper = None
        _release_exporter_state()
        gc.collect()
