"""``validate`` for decoders with a KV cache: a generation gate against the reference and per-token latency.

Random feeds do not fit a cache graph (the mask must span past + new tokens), so a decoder is
checked the way it is used: greedy decoding of seeded prompts, compared step by step with the
reference ONNX model (teacher-forced for int4; free-running too for int8 and float).
"""
from __future__ import annotations

from pathlib import Path

from retool.errors import UsageError
from retool.types import CheckResult
from retool.validators.parity import Tolerance

#: bits of MatMulNBits (None: float) -> (min top-1 agreement, min step cosine, free-running required)
GATE_DEFAULTS = {4: (31 / 32, 0.98, False), 8: (1.0, 0.999, True), None: (1.0, 0.9999, True)}


def weight_bits(path) -> int | None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    bits = [a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    return min(bits) if bits else None


def check_decoder(cand_path, sess, reference, gates, data: dict, warnings: list, measure: bool, threads: int,
                  plan, seed: int = 0) -> list[CheckResult]:
    from retool.runtime import make_session
    from retool.validators import latency as lat
    from retool.validators.generation import (DEFAULT_NEW_TOKENS, layout_from_session, make_prompts, ort_step,
                                              quantized_gate)

    layout = layout_from_session(sess)
    bits = weight_bits(cand_path)
    agree, cos, free = GATE_DEFAULTS[bits if bits in (4, 8) else None]
    tol = gates.tolerance("logits", Tolerance(atol=None, rtol=None, min_cosine=cos, min_top1=agree))
    data["task"] = "text-generation"
    data["tolerances"] = {"logits": tol.to_dict()}
    if reference is None:
        return [CheckResult("generation", True, message="no reference given: generation parity not checked",
                            severity="info")]
    ref_path = Path(reference)
    if not (ref_path.is_file() and ref_path.suffix == ".onnx"):
        raise UsageError(f"{reference}: a decoder's generation parity needs an ONNX reference (its fp32 export); "
                         f"convert the folder first, which checks it against transformers")
    ref_sess = make_session(ref_path, threads=threads)
    prompts = make_prompts(layout.vocab, seed)
    checks, gen = quantized_gate(ort_step(ref_sess), ort_step(sess), layout, prompts, DEFAULT_NEW_TOKENS,
                                 tol.min_top1 if tol.min_top1 is not None else agree,
                                 tol.min_cosine if tol.min_cosine is not None else cos, free)
    data["generation"] = gen
    data["reference"] = {"label": str(ref_path), "kind": "onnx"}
    if measure and all(c.passed for c in checks if c.severity == "gate"):
        from retool.validators import decode_latency

        pre, dec = decode_latency.samples({"candidate": ort_step(sess), "reference": ort_step(ref_sess)}, layout, plan)
        for name in ("candidate", "reference"):
            data["latency"][name]["1"] = {**lat.summarize(dec[name], 1), "prefill_p50_ms":
                                          lat.summarize(pre[name], 1)["p50_ms"]}
        data["latency"]["speedup"]["1"] = round(lat.speedup(data["latency"]["reference"]["1"],
                                                            data["latency"]["candidate"]["1"]), 4)
        data["latency"]["unit"] = (f"one decode step: 1 new token after a {decode_latency.PROMPT_TOKENS}-token "
                                   f"prompt (prefill_p50_ms: the prompt with an empty past)")
    return checks
