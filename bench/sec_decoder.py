"""Bench section ``decoder``: fp32 / int8-weight / int4 decoders, against ORT's quantizers used directly.

For each decoder: file size, prefill ms and ms per token at 1 and all threads (torch eager too),
and greedy agreement with the fp32 ONNX model (teacher-forced and free-running). Two kinds of model
(plus ``SIZES``: random Llamas at hidden 256, 512 and 1024, fp32 against int4 ms/token only):
- ``*-trained``: the tiny test fixtures, briefly trained on a synthetic rule, so agreement means
  something (their top-1 margins are large);
- ``llama-medium``: random weights at a size where weight-only kernels can pay off; its latency and
  size are meaningful, its agreement is not (random weights have near-tied logits), and it is marked so.

``fp32-unfused`` / ``int4-unfused`` are the same export without the decoder fusion (convert option
``fuse: false``, optimizers/decoder_fusion.py), so what the fused ops buy is measured in the same run.
Peers, in the same run: ``peer-nbits-int4`` is ``MatMulNBitsQuantizer`` called directly on the
exported graph (no Gemm rewrite, so GPT-2's layers stay fp32), ``peer-dynamic-int8`` is
``quantize_dynamic``. Runs in its own child process: ``python -m bench.sec_decoder WORK_DIR``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

#: name -> (family, trained?, config overrides)
MODELS = {
    "llama-trained": ("llama", True, {}),
    "gpt2-trained": ("gpt2", True, {}),
    "llama-medium": ("llama", False, {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                                      "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 2048}),
}


def decoder(settings: dict, work: Path) -> dict:
    """The section entry (bench.sections): one child process, its JSON read back."""
    from bench.proc import run_child

    work.mkdir(parents=True, exist_ok=True)
    r = run_child([sys.executable, "-m", "bench.sec_decoder", str(work), "quick" if settings.get("quick") else "full"],
                  timeout=3000)
    out = work / "decoder.json"
    if not r.ok or not out.exists():
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        status = "skipped" if r.rc == 3 else "error"
        return {"status": status, "reason": f"exit {r.rc}: {(lines[-1] if lines else '')[:400]}",
                "stderr_tail": r.tail(1500)}
    return json.loads(out.read_text())


#: "where int4 pays": random-weight Llamas of three sizes, fp32 against int4 ms/token only (name -> overrides)
SIZES = {
    "llama-h256": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 2048},
    "llama-h512": MODELS["llama-medium"][2],
    "llama-h1024": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 4096},
}


def _random_llama(folder: Path, over: dict) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from fixtures import hf_models

    torch.manual_seed(0)
    cfg = hf_models.llama_config()
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    return hf_models._save(AutoModelForCausalLM.from_config(cfg), folder)


def run_size(name: str, work: Path, quick: bool) -> dict:
    """fp32 against int4 (rtn: every algorithm writes the same MatMulNBits) ms/token and size, one size."""
    from retool.converter.core import convert
    from retool.optimizers import weight_only
    from retool.runtime import make_session
    from retool.validators import decode_latency
    from retool.validators.generation import layout_from_session

    folder = _random_llama(work / name, SIZES[name])
    fp32, int4 = work / f"{name}.fp32.onnx", work / f"{name}.int4.onnx"
    convert(str(folder), fp32)
    info = weight_only.quantize(fp32, int4, bits=4)
    layout = layout_from_session(make_session(fp32, threads=1))
    lat = decode_latency.measure({"fp32": decode_latency.ort_factory(fp32), "int4": decode_latency.ort_factory(int4)},
                                 layout, reference="fp32", budget_s=0.5 if quick else 3.0)
    return {"hidden": SIZES[name]["hidden_size"], "size_mb": round(info["size_in"] / 1e6, 2),
            "int4_size_ratio": round(info["size_out"] / info["size_in"], 3), "latency": lat}


def render_sizes(d: dict) -> str:
    lines = ["| model (random weights) | fp32 MB | int4 size × fp32 | threads | fp32 ms/token | int4 ms/token | "
             "int4 speed-up (p25–p75) |", "|---|---|---|---|---|---|---|"]
    for name, m in (d.get("sizes") or {}).items():
        if "error" in m:
            lines.append(f"| {name} | error: {m['error'][:80]} ||||||")
            continue
        for t, row in m["latency"]["by_threads"].items():
            sp = row["int4"].get("decode_speedup") or {}
            spt = (f"{sp['ratio']:.2f} ({sp['p25']:.2f}–{sp['p75']:.2f})" if sp.get("measurable")
                   else "no measurable difference")
            lines.append(f"| {name} | {m['size_mb']} | {m['int4_size_ratio']} | {t} | {row['fp32']['ms_per_token']} | "
                         f"{row['int4']['ms_per_token']} | {spt} |")
    return "\n".join(lines)


def _build(name: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from fixtures import hf_models

    fam, trained, over = MODELS[name]
    if trained:
        return hf_models.train_decoder(folder, fam)
    torch.manual_seed(0)
    cfg = hf_models.llama_config()
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    return hf_models._save(AutoModelForCausalLM.from_config(cfg), folder)


def _peer_dynamic(src, dst) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


def _peer_nbits(src, dst) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=4)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True, accuracy_level=4,
                             algo_config=cfg)
    q.process()
    onnx.save(q.model.model, str(dst))


def run_model(name: str, work: Path, quick: bool) -> dict:
    import onnx

    from retool.converter.core import convert
    from retool.converter.hf.converter import load_model
    from retool.converter.hf.decoder import make_wrapper, probe_layout
    from retool.converter.hf.folder import read_folder
    from retool.optimizers import weight_only
    from retool.runtime import make_session
    from retool.validators import decode_latency
    from retool.validators.generation import layout_from_session, make_prompts, ort_step, quantized_gate

    import torch
    import transformers

    t0 = time.perf_counter()
    folder = _build(name, work / name)
    build_s = time.perf_counter() - t0
    fp32 = work / f"{name}.fp32.onnx"
    t0 = time.perf_counter()
    _, crep = convert(str(folder), fp32)
    convert_s = time.perf_counter() - t0
    # the same export without the fusion (optimizers/decoder_fusion.py): what the fused ops buy
    unfused = work / f"{name}.fp32-unfused.onnx"
    convert(str(folder), unfused, options={"fuse": False})
    paths = {"fp32": fp32, "fp32-unfused": unfused}
    info = {}
    for label, bits, src in (("int8-weight", 8, fp32), ("int4", 4, fp32), ("int4-unfused", 4, unfused)):
        paths[label] = work / f"{name}.{label}.onnx"
        info[label] = weight_only.quantize(src, paths[label], bits=bits)
    paths["peer-nbits-int4"] = work / f"{name}.peer-nbits.onnx"
    _peer_nbits(fp32, paths["peer-nbits-int4"])
    paths["peer-dynamic-int8"] = work / f"{name}.peer-dynamic.onnx"
    _peer_dynamic(fp32, paths["peer-dynamic-int8"])

    ref_sess = make_session(fp32, threads=1)
    layout = layout_from_session(ref_sess)
    prompts = make_prompts(layout.vocab, 0)
    variants = {}
    for label, p in paths.items():
        size = p.stat().st_size
        m = onnx.load(str(p), load_external_data=False)
        row = {"size_mb": round(size / 1e6, 3), "size_ratio": round(size / fp32.stat().st_size, 3),
               "matmulnbits": weight_only.count_op(m, "MatMulNBits"), "nodes": len(m.graph.node)}
        if label != "fp32":
            checks, gen = quantized_gate(ort_step(ref_sess), ort_step(make_session(p, threads=1)), layout, prompts,
                                         32, 0, 0, True)
            tf, fr = gen["teacher_forced"], gen["free_running"]
            row.update({"teacher_forced": f"{tf['agreement']}/{tf['steps']}", "tf_min_cosine": round(tf["min_cosine"], 5),
                        "free_running": f"{fr['agreement']}/{fr['steps']}", "ref_min_margin": round(tf["min_margin"], 4)})
        variants[label] = row
    model = load_model(transformers, read_folder(folder), "text-generation")
    wrapper = make_wrapper(torch, model, probe_layout(torch, model).layers).eval()
    factories = {k: decode_latency.ort_factory(p) for k, p in paths.items()}
    factories["torch-eager"] = decode_latency.torch_factory(wrapper)
    lat = decode_latency.measure(factories, layout, reference="fp32", budget_s=0.5 if quick else 3.0)
    g = crep.data["generation"]
    genai = _genai_peer(name, folder, paths, work, quick)
    return {"genai_peer": genai, "trained": MODELS[name][1], "build_s": round(build_s, 1), "convert_s": round(convert_s, 1),
            "fp32_generation": {"greedy": f"{g['greedy']['agreement']}/{g['greedy']['steps']}",
                                "max_logit_diff": g["greedy"]["max_abs_diff"], "min_margin": g["greedy"]["min_margin"]},
            "fusion": crep.data.get("fusion"), "weight_only": info, "variants": variants, "latency": lat,
            "agreement_meaningful": MODELS[name][1]}


def _genai_peer(name: str, folder: Path, paths: dict, work: Path, quick: bool) -> dict:
    """onnxruntime-genai's builder model against retool's int4 / fp32 (bench/peer_genai.py), 1 thread."""
    from bench import peer_genai

    try:
        return peer_genai.compare(folder, paths["fp32"], paths["int4"], work / f"{name}.genai", quick,
                                  extra={peer_genai.RETOOL_INT4_UNFUSED: paths["int4-unfused"],
                                         peer_genai.RETOOL_FP32_UNFUSED: paths["fp32-unfused"]})
    except Exception as exc:  # a result too; the section's other figures stand
        import traceback

        traceback.print_exc()
        return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _render_genai(d: dict) -> str:
    from bench import peer_genai

    rows = [r for name, m in (d.get("models") or {}).items() for r in peer_genai.render(name, m.get("genai_peer"))]
    if not rows:
        return ""
    return "\n".join(["", "onnxruntime-genai peer (1 thread; ms/token median [IQR]; ratios: median x the builder's "
                      "model, 95% paired CI):", "| model | variant | ms/token | prefill ms | x builder @ genai | "
                      "x builder @ ORT loop | tokens = fp32 |", "|---|---|---|---|---|---|---|", *rows])


def render_decoder(d: dict) -> str:
    """Markdown table for bench/report.py."""
    lines = ["| model | variant | size × fp32 | ms/token @1 | × fp32 (p25–p75) | prefill ms @1 | ms/token @all | "
             "teacher-forced | free-running | min cos |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in (d.get("models") or {}).items():
        if "error" in m:
            lines.append(f"| {name} | error: {m['error'][:80]} |||||||||")
            continue
        by = m["latency"]["by_threads"]
        one, allt = by.get("1", {}), by.get(max(by, key=int), {})
        for v in list(m["variants"]) + ["torch-eager"]:
            row = m["variants"].get(v, {})
            l1, la = one.get(v, {}), allt.get(v, {})
            sp = l1.get("decode_speedup") or {}
            spt = (f"{1 / sp['ratio']:.2f} ({1 / sp['p75']:.2f}–{1 / sp['p25']:.2f})" if sp.get("measurable")
                   else ("no measurable difference" if sp else ""))
            agree = row.get("teacher_forced", "")
            if agree and not m.get("agreement_meaningful"):
                agree += " (random weights)"
            lines.append(f"| {name} | {v} ({row.get('nodes', '')} nodes) | {row.get('size_ratio', '')} | {l1.get('ms_per_token', '')} | {spt} | "
                         f"{l1.get('prefill_ms', '')} | {la.get('ms_per_token', '')} | {agree} | "
                         f"{row.get('free_running', '')} | {row.get('tf_min_cosine', '')} |")
    if d.get("sizes"):
        lines += ["", "Where int4 pays: ms/token against model size", "", render_sizes(d)]
    return "\n".join(lines) + _render_genai(d)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    work, quick = Path(args[0]), len(args) > 1 and args[1] == "quick"
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is needed for the decoder section: pip install -c constraints.txt '.[hf]'", file=sys.stderr)
        return 3
    out: dict = {"models": {}, "note": "ratios: candidate ms / fp32 ms per round, median and p25-p75"}
    for name in MODELS:
        try:
            out["models"][name] = run_model(name, work, quick)
        except Exception as exc:  # one model's failure leaves the others' figures
            import traceback

            traceback.print_exc()
            out["models"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    out["sizes"] = {}
    for name in SIZES:
        try:
            out["sizes"][name] = run_size(name, work, quick)
        except Exception as exc:
            out["sizes"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    (work / "decoder.json").write_text(json.dumps(out, indent=1, default=str))
    print(render_decoder(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
