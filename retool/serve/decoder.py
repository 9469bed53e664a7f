"""``retool repo check`` for decoders with a KV cache: greedy generation through a live Triton.

Every step is one inference request: the prefill with an empty past (length 0), then one token
per request, the ``present.*`` outputs fed back as ``past_key_values.*``. The cases are those of
the convert check (validators/generation.py): each seeded prompt alone, two prompts batched, and
a left-padded batch of two. The server's tokens and logits are compared with the same loop run
in-process by onnxruntime on the published model.onnx (the serving stack must add no error),
with the tokens stored at publish (the model must still give them), and, when publish stored a
reference's decodes (the fp32 model a quantized one came from), with the target's generation gate
(teacher forcing, its thresholds).

samples.npz keys for a decoder: ``gen/prompt.{i}`` (1, S) int64; ``gen/out.{case}.tokens`` the
published model's greedy tokens at publish; ``gen/ref.{i}.tokens`` / ``gen/ref.{i}.logits``
(float16: enough for top-1 agreement and cosine, half the bytes) the reference's decode of prompt i.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from retool.fsutil import inside
from retool.procs import temp_dir

from retool.validators.generation import (DEFAULT_NEW_TOKENS, CacheLayout, cache_step, cases, compare_steps,
                                          decode, is_decoder_graph, layout_from_session, make_prompts, ort_step,
                                          quantized_gate, summarize)

#: Max logit change the serving stack may add to the in-process run of the same file (float noise of
#: another thread count in Triton's session; the same kernels run on both sides).
SERVED_MAX_LOGIT_DIFF = 1e-3
PREFIX = "gen/"


def is_decoder(manifest: dict) -> bool:
    names = [t.get("name") for t in ((manifest.get("artifact") or {}).get("inputs") or ())]
    return is_decoder_graph(names)


def run_cases(step, layout: CacheLayout, prompts: Sequence[np.ndarray], n_new: int, batch: bool = True) -> dict:
    """case name -> decode result, for every case of ``cases(prompts)`` (only the batch-1 ones if not ``batch``)."""
    out = {}
    for name, ids, mask, _ in cases(prompts):
        if batch or ids.shape[0] == 1:
            out[name] = {**decode(step, layout, ids, mask, n_new), "ids": ids, "mask": mask}
    return out


def _gate_for(model_path, report: dict | None) -> dict:
    """The target's generation gate: from its validate report, else the defaults for its weight bits."""
    from retool.validators.decoder_check import GATE_DEFAULTS, weight_bits

    gate = (((report or {}).get("data") or {}).get("generation") or {}).get("gate")
    if gate and {"min_agreement", "min_cosine", "free_running"} <= set(gate):
        return {k: gate[k] for k in ("min_agreement", "min_cosine", "free_running")} | {"from": "its report"}
    bits = weight_bits(model_path)
    agree, cos, free = GATE_DEFAULTS[bits if bits in (4, 8) else None]
    return {"min_agreement": agree, "min_cosine": cos, "free_running": free,
            "from": f"defaults for {'int%d weights' % bits if bits in (4, 8) else 'float weights'}"}


def report_reference(report: dict | None) -> Path | None:
    """The ONNX reference a decoder's validate report was judged against, if it is still there."""
    ref = ((report or {}).get("data") or {}).get("reference") or {}
    label = ref.get("label") if ref.get("kind") == "onnx" else None
    if not label or not Path(label).is_file():
        return None
    if ref.get("sha256"):  # the file the gate was measured against, not one written there since
        from retool.fsutil import sha256_file

        if sha256_file(label) != ref["sha256"]:
            return None
    return Path(label)


def build(model_path, reference=None, report: dict | None = None, seed: int = 0) -> tuple[dict, dict]:
    """(npz arrays, manifest entry) of a decoder: prompts, its own greedy tokens, and the reference's decodes."""
    from retool.runtime import make_session

    model_path = Path(model_path)
    sess = make_session(model_path, threads=1)
    layout = layout_from_session(sess)
    prompts = make_prompts(layout.vocab, seed)
    n = DEFAULT_NEW_TOKENS
    own = run_cases(ort_step(sess), layout, prompts, n)
    arrays: dict[str, np.ndarray] = {f"{PREFIX}prompt.{i}": p for i, p in enumerate(prompts)}
    arrays.update({f"{PREFIX}out.{c}.tokens": r["tokens"] for c, r in own.items()})
    gen: dict[str, Any] = {"new_tokens": n, "seed": seed, "prompt_lengths": [int(p.shape[1]) for p in prompts],
                           "cases": list(own), "layout": dataclasses.asdict(layout), "gate": _gate_for(model_path, report),
                           "expected": "greedy tokens of the published model.onnx in onnxruntime at publish time"}
    entry: dict[str, Any] = {"kind": "generation", "generation": gen}
    reference = Path(reference) if reference else report_reference(report)
    stored = (((report or {}).get("data") or {}).get("reference") or {})
    if reference is None and stored.get("kind") == "onnx" and stored.get("label"):
        from retool import console

        gen["reference_missing"] = str(stored["label"])
        console.warn(f"{model_path}: its report's fp32 reference {stored['label']} is missing or was rewritten; "
                     f"the samples hold no reference decodes, so repo check cannot compare against fp32 "
                     f"(pass the fp32 model as the reference to keep that check)")
    if reference is not None and reference.is_file() and reference.resolve() != model_path.resolve():
        try:
            rsess = make_session(reference, threads=1)
            ref_layout = layout_from_session(rsess)
            if ref_layout != layout:
                raise ValueError(f"its cache layout {dataclasses.asdict(ref_layout)} differs")
            step = ort_step(rsess)
            for i, p in enumerate(prompts):
                r = decode(step, layout, p, np.ones_like(p), n)
                arrays[f"{PREFIX}ref.{i}.tokens"] = r["tokens"]
                arrays[f"{PREFIX}ref.{i}.logits"] = r["logits"].astype(np.float16)
            gen["reference"] = f"{reference.name} (the model it was optimised from)"
        except Exception as exc:  # a reference that does not run is noted, never fatal for publish
            gen["reference_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return arrays, entry


def stored(data: dict[str, np.ndarray]) -> dict:
    """{"prompts": [...], "tokens": {case: (B, n)}, "refs": [decode-like dicts] or None} from the npz arrays."""
    g = {k[len(PREFIX):]: v for k, v in data.items() if k.startswith(PREFIX)}
    n_prompts = sum(1 for k in g if k.startswith("prompt."))
    prompts = [g[f"prompt.{i}"].astype(np.int64) for i in range(n_prompts)]
    tokens = {k[4:-7]: v for k, v in g.items() if k.startswith("out.") and k.endswith(".tokens")}
    refs = None
    if n_prompts and all(f"ref.{i}.tokens" in g for i in range(n_prompts)):
        refs = [{"tokens": g[f"ref.{i}.tokens"], "logits": g[f"ref.{i}.logits"].astype(np.float32)}
                for i in range(n_prompts)]
    return {"prompts": prompts, "tokens": tokens, "refs": refs}


@contextlib.contextmanager
def _version_folder(repo, name: str, version: int) -> Iterator[Path]:
    """The published version folder on this machine (a local repository's own, else a temporary copy)."""
    root = getattr(repo.storage, "root", None)
    if root is not None:
        yield inside(root, f"{name}/{version}", where=repo.url)
        return
    with temp_dir("check") as tmp:
        base = f"{name}/{version}"
        for rel in repo.storage.files(base):
            if rel.endswith(".onnx") or not rel.endswith((".json", ".npz")):
                target = inside(tmp, rel, where=repo.storage.location(base))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(repo.storage.read_bytes(f"{base}/{rel}"))
        yield Path(tmp)


def triton_step(client, name: str, version: int | None, layers: int):
    """A step function whose every call is one inference request to Triton."""
    def run(outs, feeds):
        got = client.infer(name, feeds, outs, version)
        return [got[o] for o in outs]
    return cache_step(run, layers)


def _allows_batch(cfg: dict) -> bool:
    """A batch of 2 fits the served config: batching on, or a variable first dim of input_ids."""
    if int(cfg.get("max_batch_size") or 0) >= 2:
        return True
    ids = next((t for t in cfg.get("input", []) if t.get("name") == "input_ids"), None)
    dims = [int(d) for d in (ids or {}).get("dims", [])]
    return int(cfg.get("max_batch_size") or 0) == 0 and bool(dims) and dims[0] in (-1, 2)


def _first(rows: list[tuple[str, int, dict]], want, got) -> dict | None:
    """The earliest divergence over (case, row, compare_steps) rows, named."""
    hits = [(r["first_divergence"], c, k) for c, k, r in rows if r["first_divergence"] is not None]
    if not hits:
        return None
    t, c, k = min(hits)
    return {"case": c, "row": k, "step": t, "served": int(got[c]["tokens"][k, t]), "reference": int(want[c][k, t])}


def _where(d: dict, n: int) -> str:
    return (f"{d['case']}{' row %d' % d['row'] if not d['case'].startswith('greedy') else ''} first differs at "
            f"step {d['step']} of 0..{n - 1} (served token {d['served']}, reference {d['reference']})")


def _protocol(client, proto: str, name: str, version: int, layout: CacheLayout, prompts, n: int, local: dict,
              published: dict, refs, gate: dict, batch: bool) -> dict:
    import time

    calls = [0]
    inner = triton_step(client, name, version, layout.layers)

    def step(*args):
        calls[0] += 1
        return inner(*args)
    t0 = time.perf_counter()
    served = run_cases(step, layout, prompts, n, batch)
    seconds = time.perf_counter() - t0
    rows = [(c, k, compare_steps(local[c]["logits"][k], served[c]["logits"][k], local[c]["tokens"][k],
                                 served[c]["tokens"][k])) for c in served for k in range(served[c]["tokens"].shape[0])]
    s = summarize([r for _, _, r in rows])
    first = _first(rows, {c: local[c]["tokens"] for c in served}, served)
    prefill = max(float(np.max(np.abs(local[c]["prefill"] - served[c]["prefill"]))) for c in served)
    checks = []
    ok = first is None and s["max_abs_diff"] <= SERVED_MAX_LOGIT_DIFF and prefill <= SERVED_MAX_LOGIT_DIFF
    checks.append({"name": "served_vs_onnxruntime", "passed": ok, "message": "" if ok else (
        f"{_where(first, n)} against onnxruntime in-process on the same model.onnx" if first else
        f"max logit diff {max(s['max_abs_diff'], prefill):.3g} > {SERVED_MAX_LOGIT_DIFF:g} against onnxruntime "
        f"in-process on the same model.onnx")})
    out: dict[str, Any] = {
        "protocol": proto, "cases": {c: summarize([r for cc, _, r in rows if cc == c]) for c in served},
        "steps": s["steps"], "agreement": s["agreement"], "first_divergence": first, "min_cosine": s["min_cosine"],
        "max_logit_diff": max(s["max_abs_diff"], prefill), "prefill_max_abs_diff": prefill,
        "requests": calls[0], "seconds": round(seconds, 3)}
    if published:
        prow = [(c, k, compare_steps(local[c]["logits"][k], served[c]["logits"][k], published[c][k],
                                     served[c]["tokens"][k])) for c in served if c in published
                for k in range(served[c]["tokens"].shape[0])]
        pfirst = _first(prow, published, served)
        out["published_tokens"] = {"agreement": sum(r["agreement"] for _, _, r in prow),
                                   "steps": sum(r["steps"] for _, _, r in prow), "first_divergence": pfirst}
        why = ("; onnxruntime in-process gives the same as the server, so the served model.onnx is not the one "
               "published (run retool repo verify)" if first is None else "")
        checks.append({"name": "published_tokens", "passed": pfirst is None, "message": "" if pfirst is None else
                       f"{_where(pfirst, n)} against the tokens stored at publish{why}"})
    if refs is not None:
        qchecks, qdata = quantized_gate(None, step, layout, prompts, n, float(gate["min_agreement"]),
                                        float(gate["min_cosine"]), bool(gate["free_running"]), refs=refs)
        tf = qdata["teacher_forced"]
        out["teacher_forced"] = {k: tf[k] for k in ("steps", "agreement", "agreement_rate", "min_cosine",
                                                    "max_abs_diff", "first_divergence")}
        if "free_running" in qdata:
            out["free_running"] = {k: qdata["free_running"][k] for k in ("steps", "agreement", "first_divergence")}
        if "batch_invariance_max_abs_diff" in qdata:
            out["batch_invariance_max_abs_diff"] = qdata["batch_invariance_max_abs_diff"]
        for c in qchecks:
            checks.append({"name": c.name, "passed": bool(c.passed) or c.severity != "gate",
                           "message": (f"{c.message} against the stored reference" if c.message and not c.passed
                                       else c.message), "severity": c.severity})
    out["checks"] = checks
    out["passed"] = all(c["passed"] for c in checks)
    return out


def check(sess, repo, name: str, version: int, manifest: dict, cfg: dict, data: dict | None,
          protocols: Sequence[str]) -> dict:
    """The generation check of one decoder version, over each protocol. ``data``: the samples.npz arrays
    (None when publish stored none: the prompts are then the same seeded ones, with no stored tokens)."""
    from retool.runtime import make_session
    from retool.serve.client import InferClient
    from retool.inputs import SAMPLES_SEED

    entry = (manifest.get("samples") or {}).get("generation") or {}
    st = stored(data) if data else {"prompts": [], "tokens": {}, "refs": None}
    fname = cfg.get("default_model_filename") or "model.onnx"
    with _version_folder(repo, name, version) as folder:
        osess = make_session(folder / fname, threads=1)
    layout = layout_from_session(osess)
    n = int(entry.get("new_tokens") or DEFAULT_NEW_TOKENS)
    prompts = st["prompts"] or make_prompts(layout.vocab, int(entry.get("seed", SAMPLES_SEED)))
    batch = _allows_batch(cfg)
    local = run_cases(ort_step(osess), layout, prompts, n, batch)
    del osess
    vocabs = {int(r["logits"].shape[-1]) for r in st["refs"] or ()}
    if vocabs and vocabs != {int(layout.vocab)}:  # a changed file: say so rather than fail on shapes
        from retool.errors import ValidationFailed

        raise ValidationFailed(f"{name} v{version}: the served {fname} has a vocabulary of {layout.vocab}, the "
                              f"reference stored at publish {sorted(vocabs)[0]}: the file changed after publish "
                              f"(run retool repo verify {getattr(repo, 'url', 'REPO')} {name})")
    gate = entry.get("gate") or {}
    out: dict[str, Any] = {
        "new_tokens": n, "prompt_lengths": [int(p.shape[1]) for p in prompts], "cases": list(local),
        "reference": "onnxruntime in-process on the published " + fname,
        "published_tokens": bool(st["tokens"]), "stored_reference": entry.get("reference") if st["refs"] else None,
        "gate": gate if st["refs"] else None, "protocols": []}
    if st["tokens"] and not st["refs"] and (entry.get("reference_error") or "int" in str(gate.get("from"))):
        out["note"] = ("no reference decodes stored at publish (" + (entry.get("reference_error") or "no reference "
                       "known: publish with its optimize report or a samples reference") + "): the quantized "
                       "model's generation gate is not re-run through the server")
    if not st["tokens"]:
        out["note"] = ("no generation samples in this version (published before retool stored them, or "
                       f"{entry.get('error') or (manifest.get('samples') or {}).get('error') or 'not stored'}): "
                       "compared with onnxruntime only")
    for proto in protocols:
        target = sess.http_url if proto == "http" else sess.grpc_url
        with InferClient(proto, target) as client:
            out["protocols"].append(_protocol(client, proto, name, version, layout, prompts, n, local, st["tokens"],
                                              st["refs"], gate, batch))
    out["passed"] = all(p["passed"] for p in out["protocols"])
    return out


def failure(gen: dict) -> str | None:
    """The first failed check, one line: protocol, case, step."""
    for p in gen.get("protocols", []):
        for c in p["checks"]:
            if not c["passed"]:
                return f"greedy generation through Triton over {p['protocol']}: {c['message']}"
    return None


def render(model: dict) -> list[str]:
    g = model["generation"]
    what = f"{len(g['prompt_lengths'])} prompts" + (", a batch of 2 and a left-padded batch" if "batch" in g["cases"]
                                                     else "")
    lines = [f"{model['model']} v{model['version']}: greedy generation through Triton, every step a request "
             f"({what}, {g['new_tokens']} new tokens), against {g['reference']}"
             + (" and the tokens stored at publish" if g["published_tokens"] else "")]
    if g.get("note"):
        lines.append(f"  note: {g['note']}")
    for p in g["protocols"]:
        fd = p["first_divergence"]
        line = (f"  {p['protocol']}: tokens {p['agreement']}/{p['steps']} agree, first divergence "
                f"{'none' if fd is None else _where(fd, g['new_tokens'])}, min step cosine {p['min_cosine']:.6f}, "
                f"max logit diff {p['max_logit_diff']:.2e} ({p['requests']} requests in {p['seconds']:.1f} s)")
        if "published_tokens" in p:
            pt = p["published_tokens"]
            line += f"; published tokens {pt['agreement']}/{pt['steps']}"
        if "teacher_forced" in p:
            tf = p["teacher_forced"]
            line += (f"; teacher-forced vs {g['stored_reference']}: top-1 {tf['agreement']}/{tf['steps']} "
                     f"(gate {g['gate']['min_agreement']:.4g}), min cosine {tf['min_cosine']:.4f} "
                     f"(gate {g['gate']['min_cosine']})")
        lines.append(line + (" PASS" if p["passed"] else " FAIL"))
        lines += [f"    {c['name']}: {c['message']}" for c in p["checks"] if not c["passed"]]
    return lines
