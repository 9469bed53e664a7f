"""``retool repo check`` for encoder-decoders: greedy generation through a live Triton, over two models.

An encoder-decoder is published as two Triton models: the decoder (``NAME.onnx``) under its name and
the encoder (``NAME.encoder.onnx``) under any name in the same repository; the decoder's provenance holds
the encoder's sha256 (converter/hf/seq2seq.py), which is how the check finds it. Each case (each seeded
prompt alone, two prompts batched, a right-padded batch of two) costs one encoder request and one decoder
request per token. The server's tokens and logits are compared with the same loop run in-process by
onnxruntime on the two published files (the serving stack must add no error), and with the tokens
stored at publish (samples.npz ``s2s/prompt.{i}``, ``s2s/out.{case}.tokens``: the published files must
still give them).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence


import numpy as np

from retool.errors import ValidationFailed
from retool.validators.generation import compare_steps, summarize
from retool.validators.seq2seq_generation import (DEFAULT_NEW_TOKENS, LOOP_SUFFIX, cases, decoder_runner, encoder_runner, greedy,
                                                  is_seq2seq_decoder_graph, layout_from_sessions, seq2seq_prompts)

#: Max logit change the serving stack may add (float noise of another thread count in Triton's session).
SERVED_MAX_LOGIT_DIFF = 1e-3
PREFIX = "s2s/"


def is_seq2seq(manifest: dict) -> bool:
    names = [t.get("name") for t in ((manifest.get("artifact") or {}).get("inputs") or ())]
    return is_seq2seq_decoder_graph(names)


def export_params(manifest: dict) -> dict:
    """The convert step's parameters: the encoder's sha256, the start and pad tokens."""
    for step in (manifest.get("artifact") or {}).get("provenance") or ():
        params = step.get("params") or {}
        if params.get("task") == "text2text-generation":
            return params
    return {}


def find_encoder(repo, name: str, manifest: dict) -> tuple[str, int]:
    """(model, version) whose published file is this decoder's encoder; ValidationFailed naming the fix."""
    digest = export_params(manifest).get("encoder_sha256")
    if not digest:
        raise ValidationFailed(f"{name}: an encoder-decoder's decoder without its encoder's sha256 in the "
                               f"provenance; convert the folder again with retool convert and publish both files")
    for other in repo.models():
        for v in reversed(repo.versions(other)):
            if (repo.manifest(other, v).get("artifact") or {}).get("sha256") == digest:
                return other, v
    raise ValidationFailed(f"{name}: its encoder (sha256 {digest[:12]}) is not published in {repo.url}; publish "
                           f"the NAME.encoder.onnx written beside the decoder, e.g. retool publish NAME.encoder.onnx "
                           f"--repo {repo.url} --name {name}-encoder")


def _run_cases(encode, step, layout, prompts, n: int) -> dict:
    return {case: greedy(encode, step, layout, ids, mask, n) for case, ids, mask, _ in cases(prompts, layout.pad_token_id)}


def build(model_path, seed: int) -> tuple[dict, dict]:
    """(npz arrays, manifest entry) at publish: the seeded prompts and the greedy tokens of the decoder with
    the encoder its loop file (NAME.seq2seq.json beside it) names."""
    import json

    from retool.fsutil import inside, sha256_file
    from retool.runtime import make_session

    model_path = Path(model_path)
    stem = model_path.name[:-5] if model_path.name.endswith(".onnx") else model_path.name
    loop_path = model_path.with_name(stem + LOOP_SUFFIX)
    if not loop_path.is_file():
        raise FileNotFoundError(f"{loop_path.name} (the encoder-decoder's loop) is not beside {model_path.name}")
    loop = json.loads(loop_path.read_text())
    enc_path = inside(model_path.parent, str(loop["encoder"]), allow_root=False)
    dsess, esess = make_session(model_path, threads=1), make_session(enc_path, threads=1)
    layout = layout_from_sessions(dsess, loop)
    prompts = seq2seq_prompts(layout.vocab, seed)
    own = _run_cases(encoder_runner(esess.run, layout.layers), decoder_runner(dsess.run, layout.layers), layout,
                     prompts, DEFAULT_NEW_TOKENS)
    arrays = {f"{PREFIX}prompt.{i}": p for i, p in enumerate(prompts)}
    arrays.update({f"{PREFIX}out.{c}.tokens": r["tokens"] for c, r in own.items()})
    return arrays, {"kind": "seq2seq", "seq2seq": {"new_tokens": DEFAULT_NEW_TOKENS, "seed": seed, "cases": list(own),
                                                   "encoder_sha256": sha256_file(enc_path),
                                                   "expected": "greedy tokens of the published decoder and its "
                                                               "encoder in onnxruntime at publish time"}}


def _stored(data: dict) -> tuple[list, dict]:
    g = {k[len(PREFIX):]: v for k, v in data.items() if k.startswith(PREFIX)}
    prompts = [g[f"prompt.{i}"].astype(np.int64) for i in range(sum(1 for k in g if k.startswith("prompt.")))]
    return prompts, {k[4:-7]: v for k, v in g.items() if k.startswith("out.") and k.endswith(".tokens")}


def _served(client, enc: tuple[str, int], dec: tuple[str, int], layers: int):
    def run_enc(outs, feeds):
        got = client.infer(enc[0], feeds, outs, enc[1])
        return [got[o] for o in outs]

    def run_dec(outs, feeds):
        got = client.infer(dec[0], feeds, outs, dec[1])
        return [got[o] for o in outs]
    return encoder_runner(run_enc, layers), decoder_runner(run_dec, layers)


def check(sess, repo, name: str, version: int, manifest: dict, cfg: dict, data: dict | None,
          protocols: Sequence[str]) -> dict:
    """The generation check of one decoder version with its encoder, over each protocol. ``data``: the
    samples.npz arrays (None when publish stored none: the seeded prompts, compared with onnxruntime only)."""
    from retool.inputs import SAMPLES_SEED
    from retool.runtime import make_session
    from retool.serve.client import InferClient
    from retool.serve.decoder import _version_folder

    enc_name, enc_v = find_encoder(repo, name, manifest)
    sess.load(enc_name, timeout=120.0)
    params = export_params(manifest)
    loop = {"decoder_start_token_id": params.get("decoder_start_token_id", 0), "pad_token_id": params.get("pad_token_id", 0)}
    fname = cfg.get("default_model_filename") or "model.onnx"
    with _version_folder(repo, name, version) as folder:
        dsess = make_session(folder / fname, threads=1)
    with _version_folder(repo, enc_name, enc_v) as folder:
        esess = make_session(folder / "model.onnx", threads=1)
    layout = layout_from_sessions(dsess, loop)
    entry = manifest.get("samples") or {}
    prompts, published = _stored(data) if data else ([], {})
    n = int((entry.get("seq2seq") or {}).get("new_tokens") or DEFAULT_NEW_TOKENS)
    prompts = prompts or seq2seq_prompts(layout.vocab, SAMPLES_SEED)
    local = _run_cases(encoder_runner(esess.run, layout.layers), decoder_runner(dsess.run, layout.layers), layout,
                       prompts, n)
    del dsess, esess
    out: dict[str, Any] = {"new_tokens": n, "prompt_lengths": [int(p.shape[1]) for p in prompts], "cases": list(local),
                           "encoder": {"model": enc_name, "version": enc_v},
                           "reference": f"onnxruntime in-process on the published {name} v{version} and {enc_name} "
                                        f"v{enc_v}", "published_tokens": bool(published), "protocols": []}
    if not published:
        out["note"] = ("no encoder-decoder samples in this version (" + str(entry.get("error") or "not stored") +
                       "): compared with onnxruntime only")
    for proto in protocols:
        target = sess.http_url if proto == "http" else sess.grpc_url
        with InferClient(proto, target) as client:
            encode, step = _served(client, (enc_name, enc_v), (name, version), layout.layers)
            t0 = time.perf_counter()
            served = _run_cases(encode, step, layout, prompts, n)
            seconds = time.perf_counter() - t0
        rows = [(c, k, compare_steps(local[c]["logits"][k], served[c]["logits"][k], local[c]["tokens"][k],
                                     served[c]["tokens"][k])) for c in served for k in range(served[c]["tokens"].shape[0])]
        s = summarize([r for _, _, r in rows])
        first = next(((c, k, r["first_divergence"]) for c, k, r in rows if r["first_divergence"] is not None), None)
        ok = first is None and s["max_abs_diff"] <= SERVED_MAX_LOGIT_DIFF
        msg = "" if ok else (f"{first[0]} row {first[1]} first differs at step {first[2]} of 0..{n - 1}" if first else
                             f"max logit diff {s['max_abs_diff']:.3g} > {SERVED_MAX_LOGIT_DIFF:g}")
        checks = [{"name": "served_vs_onnxruntime", "passed": ok,
                   "message": f"{msg} against onnxruntime in-process" if msg else ""}]
        if published:
            bad = [(c, k, t) for c in served if c in published for k in range(served[c]["tokens"].shape[0])
                   for t in range(n) if served[c]["tokens"][k, t] != published[c][k, t]]
            checks.append({"name": "published_tokens", "passed": not bad, "message": "" if not bad else
                           f"{bad[0][0]} row {bad[0][1]} first differs at step {bad[0][2]} of 0..{n - 1} against the "
                           f"tokens stored at publish" + ("; onnxruntime in-process gives the same as the server, so "
                                                          "the served files are not the ones published (run retool "
                                                          "repo verify)" if ok else "")})
        out["protocols"].append({"protocol": proto, "steps": s["steps"], "agreement": s["agreement"],
                                 "min_cosine": s["min_cosine"], "max_logit_diff": s["max_abs_diff"],
                                 "seconds": round(seconds, 3), "passed": all(c["passed"] for c in checks),
                                 "checks": checks})
    out["passed"] = all(p["passed"] for p in out["protocols"])
    return out


def failure(gen: dict) -> str | None:
    for p in gen.get("protocols", []):
        for c in p["checks"]:
            if not c["passed"]:
                return f"encoder-decoder generation through Triton over {p['protocol']}: {c['message']}"
    return None


def render(model: dict) -> list[str]:
    g = model["seq2seq"]
    lines = [f"{model['model']} v{model['version']} with encoder {g['encoder']['model']} v{g['encoder']['version']}: "
             f"greedy generation through Triton ({len(g['prompt_lengths'])} prompts, a batch of 2 and a right-padded "
             f"batch, {g['new_tokens']} new tokens), against {g['reference']}"
             + (" and the tokens stored at publish" if g["published_tokens"] else "")]
    if g.get("note"):
        lines.append(f"  note: {g['note']}")
    for p in g["protocols"]:
        lines.append(f"  {p['protocol']}: tokens {p['agreement']}/{p['steps']} agree, min step cosine "
                     f"{p['min_cosine']:.6f}, max logit diff {p['max_logit_diff']:.2e} ({p['seconds']:.1f} s)"
                     + (" PASS" if p["passed"] else " FAIL"))
        lines += [f"    {c['name']}: {c['message']}" for c in p["checks"] if not c["passed"]]
    return lines
