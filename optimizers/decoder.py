"""``optimize`` for decoders with a KV cache (weight-only targets): quantize, gate on generation, time decoding.

A one-forward parity check on random inputs says little about a decoder, and random feeds do
not even fit its cache inputs. The gate decodes seeded prompts with the fp32 model and feeds
the same tokens to the candidate (teacher forcing), so one early flip does not cascade.
"""
from __future__ import annotations

import time
from pathlib import Path

from retool import console
from retool.errors import ValidationFailed
from retool.types import CheckResult, ProvenanceStep, Report


def is_decoder(art) -> bool:
    from retool.validators.generation import is_decoder_graph

    return is_decoder_graph([s.name for s in art.inputs])


def optimize_decoder(art, out: Path, profile, tol, *, seed: int, threads: int, measure: bool, started: str,
                     t_start: float):
    import onnx

    from retool.deps import version_of
    from retool.fsutil import atomic_write_text, external_data_files, file_size, move_onnx, sha256_file, staging_dir
    from retool.onnx_info import sidecar_report_path
    from retool.optimizers import weight_only
    from retool.optimizers.artifact import finalize
    from retool.optimizers.candidate import check_loads_path
    from retool.runtime import make_session
    from retool.validators.generation import (DEFAULT_NEW_TOKENS, layout_from_session, make_prompts, ort_step,
                                              quantized_gate)

    from retool.validators import perplexity

    o = dict(profile.extra_options)
    n_new = int(o.get("new_tokens", DEFAULT_NEW_TOKENS))
    algo = str(o.get("algorithm", "rtn"))
    heldout = perplexity.load_heldout(o["heldout"]) if o.get("heldout") else None
    ref_sess = make_session(art.path, threads=threads)
    layout = layout_from_session(ref_sess)
    calib = None
    if algo == "gptq":
        with console.step(f"gptq calibration: {CALIBRATION_SEQUENCES} sequences sampled from the fp32 model"):
            calib = calibration_feeds(ort_step(ref_sess), layout, seed)
    with staging_dir(out) as wd:
        cand = wd / f"{profile.name}.onnx"
        with console.step(f"{profile.name}: weight-only int{o['bits']} {algo} (MatMulNBits, block {o['block_size']})"):
            info = weight_only.quantize(art.path, cand, bits=int(o["bits"]), block_size=int(o["block_size"]),
                                        accuracy_level=o.get("accuracy_level"), symmetric=bool(o.get("symmetric", True)),
                                        algorithm=algo, calibration=calib)
        check_loads_path(cand, profile.name)
        cand_sess = make_session(cand, threads=threads)
        prompts = make_prompts(layout.vocab, seed)
        # tol is the target's gate with the user's --tolerance on top: None there is the user's "none"
        min_agree = tol.min_top1 if tol.min_top1 is not None else 0.0
        min_cos = tol.min_cosine if tol.min_cosine is not None else -1.0
        mode = "free-running and teacher-forced" if o.get("free_running") else "teacher-forced"
        with console.step(f"generation gate ({mode}, {len(prompts)} prompts x {n_new} tokens vs fp32)"):
            checks, gen = quantized_gate(ort_step(ref_sess), ort_step(cand_sess), layout, prompts, n_new,
                                         min_agree, min_cos, bool(o.get("free_running")))
        texts = heldout or perplexity.self_generated(ort_step(ref_sess), layout, seed + HELDOUT_SEED)
        max_ppl = o.get("max_ppl_ratio")
        with console.step(f"perplexity on {sum(len(t) for t, _ in texts)} held-out sequences "
                          f"({'given' if heldout else 'sampled from fp32'}) vs fp32"):
            ppl_check, ppl = perplexity.ppl_gate(ort_step(ref_sess), ort_step(cand_sess), layout, texts,
                                                 None if max_ppl is None else float(max_ppl))
        ppl["text"] = f"given ({o['heldout']})" if heldout else "sampled from the fp32 model (temperature 1, seeded)"
        checks = list(checks) + [ppl_check]
        del ref_sess, cand_sess
        passed = all(c.passed for c in checks if c.severity == "gate")
        warnings = []
        margin = gen["teacher_forced"]["min_margin"]
        if margin is not None and margin < 0.05:
            warnings.append(f"the fp32 model's smallest top-1 margin is {margin:.3g}: near-ties flip under any "
                            f"quantization, so agreement on these prompts says little (a random-weight model?)")
        lat = None
        if measure and passed:
            from retool.validators import decode_latency

            with console.step("measuring prefill and per-token latency (interleaved with fp32)"):
                try:
                    factories = {"fp32": decode_latency.ort_factory(art.path),
                                 "candidate": decode_latency.ort_factory(cand)}
                    eager = torch_eager_factory(art, warnings)
                    if eager is not None:
                        factories["torch-eager"] = eager
                    lat = decode_latency.measure(factories, layout)
                except Exception as exc:  # a measurement problem must not discard a good model
                    warnings.append(f"latency not measured ({type(exc).__name__}: {str(exc)[:160]})")
        staged = wd / out.name
        finalize(cand, staged)
        digest = sha256_file(staged)
        extra = external_data_files(staged)
        m = onnx.load(str(staged), load_external_data=False)
        ops: dict[str, int] = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        size_in, size_out = file_size(art.path, art.extra_files), file_size(staged, extra)
        versions = {"onnxruntime": version_of("onnxruntime") or "", "onnx": version_of("onnx") or ""}
        tools = [f"onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer({ALGO_CONFIG[algo]}, "
                 f"bits={o['bits']}, block_size={o['block_size']}, "
                 f"{'symmetric' if info['symmetric'] else 'asymmetric'}, accuracy_level={o.get('accuracy_level')})"]
        if info["gemm_rewritten"] or info["transposed_weights_folded"]:
            tools.insert(0, "retool Gemm -> MatMul + Add rewrite (weights stored transposed)")
        step = ProvenanceStep("optimize", f"retool.optimizers:{profile.name}", versions,
                              {"target": profile.name, "tolerance": tol.to_dict(), "seed": seed, "tools": tools,
                               "weight_only": info}, art.sha256, digest, started,
                              round(time.perf_counter() - t_start, 3))
        new_art = art.derive(out, step, precision=profile.precision, target=profile.name, sha256=digest,
                             extra_files=tuple(extra))
        all_checks = [CheckResult("onnxruntime.load", True),
                      CheckResult("weight_only.nodes", True, info["matmulnbits"], info["weight_matmuls"],
                                  f"{info['matmulnbits']} MatMulNBits for {info['weight_matmuls']} weight MatMuls",
                                  dict(info), "info")] + list(checks)
        data = {"target": profile.name, "chosen_target": profile.name, "profile": profile.to_dict(),
                "task": "text-generation", "reference": {"kind": "onnx", "label": str(Path(art.path).resolve()),
                                                             "sha256": art.sha256},
                "size_mb": round(size_out / 1e6, 4),
                "size_mb_input": round(size_in / 1e6, 4), "size_ratio": round(size_out / size_in, 4) if size_in else None,
                "generation": gen, "perplexity": ppl, "weight_only": info, "decode_latency": lat, "latency": None,
                "tolerance": tol.to_dict(), "node_types": dict(sorted(ops.items())), "tools": tools,
                "evaluated_on": "CPUExecutionProvider"}
        report = Report("optimize", new_art, tuple(all_checks), data, tuple(warnings))
        side = sidecar_report_path(out)
        if not passed:
            atomic_write_text(side, report.to_json())
            why = "; ".join(f"{c.name}: {c.message}" for c in checks if not c.passed and c.severity == "gate")
            raise ValidationFailed(f"{art.path}: {profile.name} decoder misses its generation gate ({why}); {out} "
                                   f"was not written (report: {side}); relax --tolerance, try another "
                                   f"algorithm ({profile.name}:algorithm=rtn|gptq|hqq) or choose cpu-int8-weight",
                                   report=report)
        move_onnx(staged, out)
    atomic_write_text(sidecar_report_path(out), report.to_json())
    return new_art, report


#: GPTQ calibration: sequences sampled from the fp32 model after seeded random prompts (its own text)
CALIBRATION_SEQUENCES = 32
#: seed offsets keep calibration, held-out perplexity text and gate prompts apart
CALIBRATION_SEED, HELDOUT_SEED = 7001, 9001
ALGO_CONFIG = {"rtn": "DefaultWeightOnlyQuantConfig",
               "gptq": "DefaultWeightOnlyQuantConfig, then retool's GPTQ ints and scales (optimizers/gptq.py)",
               "hqq": "HQQWeightOnlyQuantConfig"}


def calibration_feeds(step, layout, seed: int) -> list[dict]:
    """GPTQ's calibration: prefill feeds (empty cache) of text the fp32 model samples itself."""
    import numpy as np

    from retool.validators.generation import past_names
    from retool.validators.perplexity import self_generated

    (ids, _), = self_generated(step, layout, seed + CALIBRATION_SEED, sequences=CALIBRATION_SEQUENCES)
    feeds = []
    for i in range(0, len(ids), 4):
        chunk = ids[i:i + 4]
        pos = np.broadcast_to(np.arange(chunk.shape[1], dtype=np.int64), chunk.shape).copy()
        feeds.append({"input_ids": chunk, "attention_mask": np.ones_like(chunk), "position_ids": pos,
                      **dict(zip(past_names(layout.layers), layout.empty_past(len(chunk))))})
    return feeds


def torch_eager_factory(art, warnings: list):
    """torch eager decoding of the folder this model was converted from, when it is still there and safe."""
    src = next((Path(str(st.params.get("source", ""))) for st in art.provenance
                if st.stage == "convert" and st.params.get("framework") == "hf"), None)
    if src is None or not src.is_dir():
        return None
    try:
        import torch
        import transformers

        from retool.converter.hf.converter import load_model
        from retool.converter.hf.decoder import make_wrapper, probe_layout
        from retool.converter.hf.folder import check_loadable, read_folder
        from retool.validators.decode_latency import torch_factory

        folder = read_folder(src)
        check_loadable(folder, trust_remote_code=False)  # never run a folder's code just to time it
        model = load_model(transformers, folder, "text-generation")
        return torch_factory(make_wrapper(torch, model, probe_layout(torch, model).layers).eval())
    except Exception as exc:  # the comparison is a report detail
        warnings.append(f"torch eager latency not measured ({type(exc).__name__}: {str(exc)[:160]})")
        return None
