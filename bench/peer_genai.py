"""onnxruntime-genai as a peer in bench's ``decoder`` section: what an LLM user on CPU picks.

From the same Hugging Face folder, genai's model builder makes its int4 CPU model
(``python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p int4 -e cpu``), and four
variants generate the same greedy tokens from the same 32-token prompt, 1 intra-op thread,
interleaved round by round (rotating order):

- ``builder int4 @ genai``: the builder's model in genai's own runtime (``og.Generator``);
- ``builder int4 @ ORT loop``: the builder's model in retool's plain ORT greedy loop
  (``retool.validators.generation.decode``);
- ``retool int4 @ ORT loop`` and ``retool fp32 @ ORT loop``: retool's artifacts in that loop.

Per round and variant: prefill ms (the prompt, plus picking the first token) and ms per token (the
mean of the following decode steps). Ratios are ``median(variant) / median(builder)`` with the 95 %
paired bootstrap interval (retool.speed), and the issue's goal (retool int4 <= 1.1x the builder's
model in the same loop) is judged by retool.speed.decide. The fixture folders have no tokenizer;
the builder needs one (it loads and copies it), so a word-level one over the model's vocabulary is
written beside links to the model's files. Families the builder does not support are skipped with
its reason.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

INSTALL = "pip install -c constraints.txt '.[bench]' (make bench does)"
GENAI, BUILDER_LOOP, RETOOL_INT4, RETOOL_FP32 = ("builder int4 @ genai", "builder int4 @ ORT loop",
                                                 "retool int4 @ ORT loop", "retool fp32 @ ORT loop")
#: retool's exports without the decoder fusion (optimizers/decoder_fusion.py), when the section passes them
RETOOL_INT4_UNFUSED, RETOOL_FP32_UNFUSED = "retool int4 unfused @ ORT loop", "retool fp32 unfused @ ORT loop"
PROMPT_TOKENS = 32
GOAL_VS_BUILDER = 1.1
#: the builder's model is compared only when its prompt logits are about as close to retool's fp32 as retool's int4
COMPARABLE_COSINE_GAP = 0.01


def missing() -> str | None:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return f"onnxruntime-genai is not installed: {INSTALL}"
    return None


def builder_input(folder: Path, dst: Path) -> Path:
    """``dst``: links to ``folder``'s files plus a word-level tokenizer over the model's vocabulary
    (tokens ``t0``..), with the config's bos / eos / pad ids as its special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dst.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((folder / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {k: f"t{cfg[k + '_id'] if isinstance(cfg.get(k + '_id'), int) else 0}"
               for k in ("bos_token", "eos_token", "pad_token")}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", **special).save_pretrained(str(dst))
    return dst


def unsupported(folder: Path) -> str | None:
    """Why the builder cannot export this family (its dispatch names every architecture it takes), or None."""
    import importlib.util

    arch = (json.loads((folder / "config.json").read_text()).get("architectures") or ["(none)"])[0]
    spec = importlib.util.find_spec("onnxruntime_genai")
    builder = Path(spec.origin).parent / "models" / "builder.py"
    if builder.exists() and f'"{arch}"' not in builder.read_text():
        return f"the genai model builder does not support {arch} (onnxruntime_genai/models/builder.py has no exporter for it)"
    return None


def build(folder: Path, out: Path, timeout: float = 1200) -> dict:
    """The builder's int4 CPU model of ``folder`` in ``out``: {"status", "reason"?, "build_s", "model"}."""
    why = unsupported(folder)
    if why:
        return {"status": "skipped", "reason": why}
    src = builder_input(folder, out.parent / (out.name + ".input"))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "int4",
           "-e", "cpu", "-c", str(out.parent / (out.name + ".cache"))]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"the genai model builder ran over {timeout:.0f} s"}
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    if r.returncode != 0 or not (out / "model.onnx").exists():
        last = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
        status = "skipped" if "not currently supported" in last else "error"
        return {"status": status, "reason": f"genai model builder: {last.strip()[:300]}"}
    return {"status": "ok", "build_s": round(time.perf_counter() - t0, 1), "model": str(out / "model.onnx"),
            "command": " ".join(["python -m onnxruntime_genai.models.builder", "-i", "FOLDER", "-o", "OUT", "-p",
                                 "int4", "-e", "cpu"])}


def _genai_model(out: Path, threads: int):
    import onnxruntime_genai as og

    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return og.Model(og.Config(str(out)))


def _genai_run(model, prompt, n_new: int) -> tuple[float, list[float], list[int]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    # min_length: no early stop at eos, so every variant makes n_new tokens (retool's loop has no eos)
    params.set_search_options(max_length=len(prompt) + n_new, min_length=len(prompt) + n_new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()  # the first token, from the prompt's logits
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(n_new - 1):
        t = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t)
    return prefill, steps, [int(x) for x in gen.get_sequence(0)[len(prompt):]]


def _loop_step(sess, layers: int):
    """retool's step over a session, feeding only the inputs the graph has (the builder's takes no position_ids)."""
    from retool.validators.generation import past_names, present_names

    names = {i.name for i in sess.get_inputs()}
    pin, outs = past_names(layers), ["logits"] + present_names(layers)

    def step(ids, mask, pos, past):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(pin, past))}
        res = sess.run(outs, {k: v for k, v in feeds.items() if k in names})
        return res[0], list(res[1:])
    return step


def _loop_run(step, layout, prompt, n_new: int) -> tuple[float, list[float], list[int]]:
    """retool's greedy loop (generation.decode), each step timed: the first is the prefill."""
    import numpy as np

    from retool.validators.generation import decode

    times = []

    def timed(*a):
        t = time.perf_counter()
        r = step(*a)
        times.append(time.perf_counter() - t)
        return r
    ids = np.asarray([prompt], np.int64)
    got = decode(timed, layout, ids, np.ones_like(ids), n_new)
    return times[0], times[1:], [int(x) for x in got["tokens"][0]]


def graph_ops(path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    keep = ("MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
            "RotaryEmbedding", "MatMul", "Split")
    return {"nodes": len(m.graph.node), **{k: ops[k] for k in keep if k in ops}}


def compare(folder: Path, fp32: Path, int4: Path, work: Path, quick: bool, threads: int = 1,
            extra: dict | None = None) -> dict:
    """The four variants of one model (and ``extra``: label -> another retool ONNX file run by the same
    loop), interleaved; ``status`` skipped with the reason where the builder (or the extra) is missing."""
    import numpy as np

    from bench.stats import interleaved, summarize
    from retool.runtime import make_session
    from retool.speed import decide, paired_ratio_interval, rule_text
    from retool.validators.generation import CacheLayout, layout_from_session, ort_step

    why = missing()
    if why:
        return {"status": "skipped", "reason": why}
    out = work / "genai-builder"
    res = build(folder, out)
    if res["status"] != "ok":
        return res
    n_new = 16 if quick else 32
    ref = make_session(fp32, threads=threads)
    layout = layout_from_session(ref)
    builder_sess = make_session(res["model"], threads=threads)
    dec = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]  # its head size is symbolic
    blayout = CacheLayout(dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"], layout.vocab)
    gmodel = _genai_model(out, threads)
    prompt = [int(x) for x in np.random.default_rng(7).integers(3, layout.vocab, PROMPT_TOKENS)]
    runs = {GENAI: lambda: _genai_run(gmodel, prompt, n_new),
            BUILDER_LOOP: lambda s=_loop_step(builder_sess, blayout.layers): _loop_run(s, blayout, prompt, n_new),
            RETOOL_INT4: lambda s=ort_step(make_session(int4, threads=threads)): _loop_run(s, layout, prompt, n_new),
            RETOOL_FP32: lambda s=ort_step(ref): _loop_run(s, layout, prompt, n_new)}
    for label, p in (extra or {}).items():
        runs[label] = lambda s=ort_step(make_session(p, threads=threads)): _loop_run(s, layout, prompt, n_new)
    tokens = {k: f()[2] for k, f in runs.items()}
    ids = np.asarray([prompt], np.int64)
    mask, pos = np.ones_like(ids), np.arange(len(prompt), dtype=np.int64)[None]
    logits = {"builder int4": _loop_step(builder_sess, blayout.layers)(ids, mask, pos, blayout.empty_past(1))[0],
              "retool int4": ort_step(make_session(int4, threads=threads))(ids, mask, pos, layout.empty_past(1))[0]}
    fp = ort_step(ref)(ids, mask, pos, layout.empty_past(1))[0].astype(np.float64)
    eos = json.loads((out / "genai_config.json").read_text())["model"].get("eos_token_id")

    def agree(a: list[int], ref: list[int]) -> str:
        # up to the reference's first eos: genai is kept from stopping there, so it picks the runner-up
        n = next((i for i, t in enumerate(ref) if t == eos or (isinstance(eos, list) and t in eos)), len(ref))
        return f"{sum(x == y for x, y in zip(a[:n], ref[:n]))}/{n}"
    pre: dict = {k: [] for k in runs}
    tok: dict = {k: [] for k in runs}

    def timed(k):
        def run():
            p, steps, _ = runs[k]()
            pre[k].append(p * 1e3)
            tok[k].append(float(np.mean(steps)) * 1e3)
        return run
    interleaved({k: timed(k) for k in runs}, warmup=1, min_rounds=5 if quick else 10, budget_s=3.0 if quick else 20.0)

    def ratio(k, base):
        est, lo, hi = paired_ratio_interval(tok[k], tok[base])  # median(k) / median(base): x the base
        return {"estimate": round(est, 3), "ci95": [round(lo, 3), round(hi, 3)]}

    variants = {}
    for k in runs:
        variants[k] = {"ms_per_token": summarize(tok[k], unit="ms", digits=4),
                       "prefill_ms": summarize(pre[k], unit="ms", digits=4),
                       "tokens_agree_with_fp32": agree(tokens[k], tokens[RETOOL_FP32]),
                       "x_builder_at_genai": ratio(k, GENAI), "x_builder_at_loop": ratio(k, BUILDER_LOOP)}
    est, lo, hi = paired_ratio_interval(tok[RETOOL_INT4], tok[BUILDER_LOOP])
    goal = decide(est, lo, hi, GOAL_VS_BUILDER, higher_is_better=False, rule=rule_text("ratio"),
                  samples=len(tok[RETOOL_INT4]))
    cos = {k: float((v * fp).sum() / (np.linalg.norm(v) * np.linalg.norm(fp))) for k, v in logits.items()}
    # a speed against a model that computes something else is no comparison
    comparable = cos["builder int4"] >= cos["retool int4"] - COMPARABLE_COSINE_GAP
    res.update({"threads": threads, "builder_model_comparable": comparable, "prompt_tokens": PROMPT_TOKENS, "new_tokens": n_new,
                "rounds": len(tok[GENAI]), "variants": variants,
                "genai_tokens_agree_with_loop": agree(tokens[GENAI], tokens[BUILDER_LOOP]),
                # is the builder's model the same function? prompt logits against retool's parity-checked fp32
                "prefill_logits_vs_fp32": {k: {"max_abs_diff": round(float(np.abs(v - fp).max()), 4),
                                               "cosine": round(cos[k], 6)} for k, v in logits.items()},
                "graphs": {"builder int4": graph_ops(res["model"]), "retool int4": graph_ops(int4),
                           "retool fp32": graph_ops(fp32), **{k: graph_ops(p) for k, p in (extra or {}).items()}},
                "goal_retool_int4_vs_builder_at_loop": goal.to_dict()})
    return res


def render(name: str, g: dict) -> list[str]:
    """Markdown rows for sec_decoder's table of the genai peer."""
    if not g:
        return []
    if g.get("status") != "ok":
        return [f"| {name} | genai peer {g.get('status')}: {g.get('reason', '')[:120]} ||||||"]
    rows = []
    for k, v in g["variants"].items():
        m, p = v["ms_per_token"], v["prefill_ms"]
        a, b = v["x_builder_at_genai"], v["x_builder_at_loop"]
        rows.append(f"| {name} | {k} | {m['median']:.3f} [{m['p25']:.3f}-{m['p75']:.3f}] | {p['median']:.2f} | "
                    f"{a['estimate']:.2f} ({a['ci95'][0]:.2f}-{a['ci95'][1]:.2f}) | "
                    f"{b['estimate']:.2f} ({b['ci95'][0]:.2f}-{b['ci95'][1]:.2f}) | {v['tokens_agree_with_fp32']} |")
    acc = "; ".join(f"{k}: max abs diff {v['max_abs_diff']}, cos {v['cosine']}" for k, v in g["prefill_logits_vs_fp32"].items())
    rows.append(f"| {name} | prompt logits vs retool fp32 | {acc} |||||")
    nodes = "; ".join(f"{k}: {v['nodes']}" for k, v in (g.get("graphs") or {}).items())
    rows.append(f"| {name} | graph nodes | {nodes} |||||")
    goal = g["goal_retool_int4_vs_builder_at_loop"]["text"] if g.get("builder_model_comparable") else (
        "not comparable: the builder's model computes a different function from the HF model's")
    rows.append(f"| {name} | goal: retool int4 <= {GOAL_VS_BUILDER}x builder @ loop | {goal} |||||")
    return rows
