"""Encoder-decoders (T5, BART, Marian, MBart) from a ``save_pretrained`` folder: ``text2text-generation``.

Three files come out for ``-o NAME.onnx`` (names and loop: validators/seq2seq_generation.py):

- ``NAME.onnx``, the decoder, one graph for every step: the self-attention cache comes in as
  ``past_key_values.{i}.decoder.*`` (empty at the first step) and the cross-attention cache as
  ``past_key_values.{i}.encoder.*``; out come ``logits`` and ``present.{i}.decoder.*``;
- ``NAME.encoder.onnx``: ``last_hidden_state`` and the cross-attention cache ``present.{i}.encoder.*``;
- ``NAME.seq2seq.json``: the loop (start token, pad, which output feeds which input).

Optimum splits the decoder in two (``decoder_model.onnx`` computes the cross-attention cache at step 1,
``decoder_with_past_model.onnx`` reuses it) or merges both behind an ``If``. Here the encoder computes it
once, so one decoder graph without ``If`` serves every step: the loop is the causal-LM loop plus one
constant input, which is the simplest to serve (two Triton models) and to verify.
Parity: an onnxruntime greedy loop against transformers' ``generate(do_sample=False)``.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from retool.converter.base import ExportResult, Reference, SourceModel
from retool.errors import ConversionError, first_line
from retool.types import TensorSpec
from retool.validators.seq2seq_generation import (DEFAULT_NEW_TOKENS, ENCODER_SUFFIX, LOOP_FORMAT, LOOP_SUFFIX,
                                                  Seq2SeqLayout, cross_past_names, cross_present_names,
                                                  self_past_names, self_present_names, seq2seq_prompts)

ENC_DIMS = {"input_ids": ("batch", "encoder_sequence"), "attention_mask": ("batch", "encoder_sequence"),
            "last_hidden_state": ("batch", "encoder_sequence", None)}
CROSS_DIMS = ("batch", None, "encoder_sequence", None)
DEC_DIMS = {"input_ids": ("batch", "decoder_sequence"), "encoder_attention_mask": ("batch", "encoder_sequence"),
            "logits": ("batch", "decoder_sequence", None)}
PAST_DIMS = ("batch", None, "past_decoder_sequence", None)
PRESENT_DIMS = ("batch", None, "total_decoder_sequence", None)


def companion_paths(path) -> tuple[Path, Path]:
    """(encoder, loop JSON) beside the decoder file ``path``."""
    p = Path(path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ENCODER_SUFFIX), p.with_name(stem + LOOP_SUFFIX)


def _cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    for field in ("cache", "past_key_values"):
        value = getattr(out, field, None)
        if value is not None:
            return value
    raise ValueError("the model returned no cache (use_cache=True was ignored)")


def _flat(cache) -> list:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _d_model(config) -> int:
    return int(getattr(config, "d_model", None) or config.hidden_size)


def make_wrappers(torch, model, layers: int, start: int):
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    arg, width = _cache_argument(model), _d_model(model.config)

    class Encoder(torch.nn.Module):
        """The encoder and, from one decoder call on the start token, the cross-attention cache."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                              return_dict=True).last_hidden_state
            first = input_ids[:, :1] * 0 + start
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=attention_mask,
                             decoder_input_ids=first, use_cache=True, return_dict=True, **{arg: cache})
            return (hidden, *_flat(_out_cache(out).cross_attention_cache))

    class Decoder(torch.nn.Module):
        """One decoder step with both caches given as tensors. The cross-attention layers reuse the given cache
        (is_updated), so the encoder's hidden states only lend their shape: zeros stand in for them."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, encoder_attention_mask, *past):
            own = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            cross = [(past[2 * layers + 2 * i], past[2 * layers + 2 * i + 1]) for i in range(layers)]
            cache = EncoderDecoderCache(DynamicCache(own), DynamicCache(cross))
            cache.is_updated = {i: True for i in range(layers)}
            b, n = encoder_attention_mask.shape
            hidden = torch.zeros((b, n, width), dtype=past[2 * layers].dtype)
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                             attention_mask=encoder_attention_mask, decoder_input_ids=input_ids, use_cache=True,
                             return_dict=True, **{arg: cache})
            return (out.logits, *_flat(_out_cache(out).self_attention_cache))
    return Encoder().eval(), Decoder().eval()


def _start_and_pad(config) -> tuple[int, int]:
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if start is None:
        raise ConversionError(f"{type(config).__name__}: no decoder_start_token_id in config.json; set it "
                              f"(T5: the pad id, BART: the eos id) and save the folder again")
    return int(start), int(pad if pad is not None else start)


class Seq2SeqSource(SourceModel):
    framework = "hf"

    def __init__(self, model, folder, request):
        import torch

        from retool.deps import version_of

        self.torch, self.model, self.folder, self.request = torch, model, folder, request
        cfg = model.config
        if hasattr(model, "set_attn_implementation"):
            # torch 2.13's decompositions turn the sdpa path's reshape of a transposed output into an invalid
            # view under dynamic shapes (T5's encoder); eager attention exports
            model.set_attn_implementation("eager")
        start, pad = _start_and_pad(cfg)
        layers = int(getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "decoder_layers", None)
                     or cfg.num_hidden_layers)
        self.encoder, self.decoder = make_wrappers(torch, model, layers, start)
        try:
            with torch.no_grad():
                cross = self.encoder(torch.zeros((1, 2), dtype=torch.long), torch.ones((1, 2), dtype=torch.long))[1:]
        except Exception as exc:
            raise ConversionError(f"{type(model).__name__}: its cross-attention cache could not be read "
                                  f"({first_line(exc, 200, with_type=True)}); retool exports T5, BART, Marian and "
                                  f"MBart encoder-decoders") from None
        if len(cross) != 2 * layers or not all(t.dim() == 4 for t in cross):
            raise ConversionError(f"{type(model).__name__}: its cross-attention cache is not {layers} layers of "
                                  f"(batch, heads, sequence, head_dim) tensors; it cannot be exported yet")
        k = cross[0]
        self.layout = Seq2SeqLayout(layers, int(k.shape[1]), int(k.shape[3]), int(cfg.vocab_size), start, pad,
                                    str(k.dtype).replace("torch.", ""))
        L = self.layout
        self.input_specs = (TensorSpec("input_ids", "int64", DEC_DIMS["input_ids"]),
                            TensorSpec("encoder_attention_mask", "int64", DEC_DIMS["encoder_attention_mask"])) + tuple(
            TensorSpec(n, L.dtype, PAST_DIMS[:1] + (L.heads,) + PAST_DIMS[2:3] + (L.head_dim,))
            for n in self_past_names(L.layers)) + tuple(
            TensorSpec(n, L.dtype, ("batch", L.heads, "encoder_sequence", L.head_dim)) for n in cross_past_names(L.layers))
        self.source_files = tuple(folder.safetensors or folder.pickles) + (Path(folder.path) / "config.json",)
        self.versions = {"torch": torch.__version__, "transformers": version_of("transformers") or "",
                         "onnx": version_of("onnx") or "", "onnxscript": version_of("onnxscript") or ""}
        self.new_tokens = int(request.options.get("new_tokens") or DEFAULT_NEW_TOKENS)
        self.report_data = {}
        self.encoder_path: Path | None = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        torch, L = self.torch, self.layout
        names = ["input_ids", "encoder_attention_mask"] + self_past_names(L.layers) + cross_past_names(L.layers)
        with torch.no_grad():
            out = self.decoder(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
        return [t.numpy() for t in out]

    # -- export ------------------------------------------------------------
    def _export(self, module, args, path: Path, names: list[str], outputs: list[str], dyn) -> bool:
        import warnings

        from retool.converter.torch_converter import EXTERNAL_DATA_BYTES, _quiet_stdout

        torch = self.torch
        large = sum(t.numel() * t.element_size() for t in self.model.state_dict().values()) > EXTERNAL_DATA_BYTES
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs, dynamic_shapes=dyn,
                              dynamo=True, opset_version=max(18, self.request.opset or 18), external_data=large,
                              optimize=True, verbose=False)
        return large

    def export(self, path: Path, opset: int | None) -> ExportResult:
        import logging

        from retool.converter.hf.dims import rename_dims
        from retool.fsutil import sha256_file

        torch, L = self.torch, self.layout
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        enc_path, loop_path = companion_paths(path)
        g = torch.Generator().manual_seed(self.request.seed)
        # batch 2, encoder 5, decoder 3, past 4: no axis of size 0 or 1 for the tracer to specialise
        b, e, s, p = 2, 5, 3, 4
        D = torch.export.Dim.DYNAMIC
        ids = torch.randint(0, L.vocab, (b, e), generator=g)
        enc_out = ["last_hidden_state"] + cross_present_names(L.layers)
        large = self._export(self.encoder, (ids, torch.ones((b, e), dtype=torch.long)), enc_path,
                             ["input_ids", "attention_mask"], enc_out,
                             {"input_ids": {0: D, 1: D}, "attention_mask": {0: D, 1: D}})
        rename_dims(enc_path, {k: ENC_DIMS[k] for k in ("input_ids", "attention_mask")},
                    {"last_hidden_state": ENC_DIMS["last_hidden_state"], **{n: CROSS_DIMS for n in enc_out[1:]}})
        past = [torch.randn((b, L.heads, p, L.head_dim), generator=g) for _ in range(2 * L.layers)]
        cross = [torch.randn((b, L.heads, e, L.head_dim), generator=g) for _ in range(2 * L.layers)]
        dyn = {"input_ids": {0: D, 1: D}, "encoder_attention_mask": {0: D, 1: D},
               "past": tuple({0: D, 2: D} for _ in range(4 * L.layers))}
        self._export(self.decoder, (torch.randint(0, L.vocab, (b, s), generator=g), torch.ones((b, e), dtype=torch.long),
                                    *past, *cross), path, [sp.name for sp in self.input_specs],
                     ["logits"] + self_present_names(L.layers), dyn)
        ins = {k: DEC_DIMS[k] for k in ("input_ids", "encoder_attention_mask")}
        ins.update({n: PAST_DIMS for n in self_past_names(L.layers)})
        ins.update({n: CROSS_DIMS for n in cross_past_names(L.layers)})
        rename_dims(path, ins, {"logits": DEC_DIMS["logits"], **{n: PRESENT_DIMS for n in self_present_names(L.layers)}})
        self.encoder_path = enc_path
        loop_path.write_text(json.dumps(self.loop(path.name, enc_path.name), indent=1) + "\n")
        return ExportResult("torch.onnx.export(dynamo, encoder + decoder with both caches as tensors)",
                            {"exporter": "dynamo", "task": "text2text-generation", "external_data": large,
                             "companion_files": [enc_path.name, loop_path.name], "encoder_sha256": sha256_file(enc_path),
                             "decoder_start_token_id": L.decoder_start_token_id, "pad_token_id": L.pad_token_id,
                             "layers": L.layers,
                             "heads": L.heads, "head_dim": L.head_dim})

    def loop(self, decoder: str, encoder: str) -> dict:
        L, cfg = self.layout, self.model.config
        return {"format": LOOP_FORMAT, "task": "text2text-generation", "architecture": type(self.model).__name__,
                "encoder": encoder, "decoder": decoder, "decoder_start_token_id": L.decoder_start_token_id,
                "pad_token_id": L.pad_token_id, "eos_token_id": getattr(cfg, "eos_token_id", None),
                "layers": L.layers, "heads": L.heads, "head_dim": L.head_dim, "vocab": L.vocab,
                "encoder_to_decoder": {**dict(zip(cross_present_names(L.layers), cross_past_names(L.layers))),
                                       "attention_mask": "encoder_attention_mask"},
                "decoder_to_decoder": dict(zip(self_present_names(L.layers), self_past_names(L.layers))),
                "loop": "encoder once; then decoder steps from input_ids=[[decoder_start_token_id]] with empty "
                        "past_key_values.*.decoder (sequence 0), feeding present.*.decoder back and the last "
                        "argmax token as input_ids, the encoder's cache unchanged at every step"}

    # -- generation parity -------------------------------------------------
    def reference(self, art, request, tol):
        prompts = seq2seq_prompts(self.layout.vocab, request.seed)
        return Reference([], (prompts, generate_refs(self.torch, self.model, self.layout, prompts, self.new_tokens)))

    def compare(self, sess, ref, art, request, tol) -> list:
        from retool.runtime import make_session
        from retool.types import CheckResult
        from retool.validators.seq2seq_generation import decoder_runner, encoder_runner, parity

        prompts, refs = ref.outputs
        try:
            enc = make_session(self.encoder_path)
        except Exception as exc:
            return [CheckResult("onnxruntime.load:encoder", False, message=first_line(exc, 300, with_type=True))]
        max_diff = tol.atol if tol.atol is not None else 1e-4
        L = self.layout
        checks, data = parity(encoder_runner(enc.run, L.layers), decoder_runner(sess.run, L.layers), L, prompts,
                              refs, self.new_tokens, max_diff)
        data["reference"] = "transformers generate(do_sample=False), each prompt alone"
        data["encoder"] = self.encoder_path.name if self.encoder_path else None
        self.report_data = {"task": "text2text-generation", "generation": data}
        return [CheckResult("onnxruntime.load:encoder", True)] + checks

    def close(self) -> None:
        import gc

        from retool.converter.torch_converter import _release_exporter_state

        self.model = self.encoder = self.decoder = None
        _release_exporter_state()
        gc.collect()


def generate_refs(torch, model, layout: Seq2SeqLayout, prompts, n_new: int) -> list[dict]:
    """transformers' greedy ``generate`` on each prompt alone: tokens (1, n) and raw logits (1, n, V).

    The generation config is replaced so that nothing but argmax picks tokens: no EOS stop, no forced
    BOS/EOS (BART's config forces EOS at max_length), no repetition rules."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(decoder_start_token_id=layout.decoder_start_token_id,
                                               pad_token_id=layout.pad_token_id, eos_token_id=None,
                                               do_sample=False, num_beams=1)
    refs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.from_numpy(p)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 min_new_tokens=0, return_dict_in_generate=True, output_logits=True)
            tokens = out.sequences[:, 1:].numpy()
            logits = torch.stack(list(out.logits), 1).float().numpy()
            if tokens.shape[1] != n_new or not np.array_equal(tokens, logits.argmax(-1)):
                raise ConversionError(f"{type(model).__name__}: transformers' generate did not return {n_new} greedy "
                                      f"tokens (got {tokens.shape[1]}, or tokens that are not the argmax of its "
                                      f"logits); the reference cannot be taken")
            refs.append({"tokens": tokens.astype(np.int64), "logits": logits})
    return refs
