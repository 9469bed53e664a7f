"""Decoders served by a real Triton (the nvidia-pytriton binary): ``retool repo check`` runs a greedy
generation where every step is an inference request, over HTTP and gRPC, and compares it with
onnxruntime in-process, with the tokens stored at publish, and (int4) with the fp32 reference's gate.
One server is shared by the module; the trained decoder is shared with test_decoder_llm.py."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tritonclient")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 64  # the Llama fixture (grouped-query attention)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from fixtures import hf_models
    from retool.optimizers.core import optimize
    from retool.publish import publish

    _, fp32, _ = hf_models.converted_decoder(tmp_path_factory, "llama")
    root = tmp_path_factory.mktemp("serve-decoder")
    repo = root / "repo"
    publish(fp32, repo, "lm", max_regression="off")
    int4 = root / "lm.int4.onnx"
    optimize(fp32, int4, target="cpu-int4", measure=False)
    publish(int4, repo, "lm-int4", max_regression="off")  # its sidecar report names the fp32 reference
    publish(fp32, repo, "lm-broken", max_regression="off")
    publish(fp32, repo, "lm-old", max_regression="off", samples=False)  # as published before generation samples
    publish(hf_models.converted_decoder(tmp_path_factory, "gpt2")[1], repo, "gpt2", max_regression="off")
    # the served file changes after publish: one token's embedding is negated, a token no prompt holds,
    # so the greedy tokens change only once the model has generated it and reads it back from the cache
    with np.load(repo / "lm" / "1" / "samples.npz") as z:
        prompts = [z[f"gen/prompt.{i}"] for i in range(3)]
    bases = [_ort_greedy(fp32, p, 32) for p in prompts]
    late = {t: min((b.index(t) for b in bases if t in b), default=99) for t in range(VOCAB)
            if not any(t in p for p in prompts)}
    token = max((t for t in late if late[t] < 28), key=lambda t: late[t], default=bases[0][10])
    path = repo / "lm-broken" / "1" / "model.onnx"
    m = onnx.load(str(path))
    emb = next(i for i in m.graph.initializer if i.name.endswith("embed_tokens.weight"))
    a = onnx.numpy_helper.to_array(emb).copy()
    a[token] = -a[token]
    emb.CopyFrom(onnx.numpy_helper.from_array(a, emb.name))
    onnx.save(m, str(path))
    broken = [_ort_greedy(path, p, 32) for p in prompts]
    diverge = min(next((t for t, (x, y) in enumerate(zip(b, c)) if x != y), 99) for b, c in zip(bases, broken))
    assert diverge < 32, "the corruption changed no greedy token"
    return {"repo": repo, "fp32": fp32, "int4": int4, "diverge": diverge}


@pytest.fixture(scope="module")
def server(repo):
    from retool.serve.server import TritonServer

    with TritonServer(repo["repo"]) as srv:
        yield srv


def _check(repo, server, name):
    from retool.serve.check import check

    return check(str(repo["repo"]), name, url=server.http_url, grpc_url=server.grpc_url)


def test_publish_stores_prompts_tokens_and_the_layout(repo):
    from retool.publish import open_repo

    man = open_repo(repo["repo"]).manifest("lm", 1)
    gen = man["samples"]["generation"]
    assert man["samples"]["kind"] == "generation" and gen["new_tokens"] == 32
    assert gen["layout"] == {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab": VOCAB,
                             "dtype": "float32"}
    assert gen["cases"] == ["greedy.0", "greedy.1", "greedy.2", "batch", "left_padded"]
    with np.load(repo["repo"] / "lm" / "1" / "samples.npz") as z:
        assert z["gen/prompt.2"].shape == (1, 5) and z["gen/out.left_padded.tokens"].shape == (2, 32)
        prompt, tokens = z["gen/prompt.0"], z["gen/out.greedy.0.tokens"]
    assert "reference" not in gen  # the fp32 export is its own reference
    # the stored tokens are what a plain onnxruntime loop over the published file gives
    assert _ort_greedy(repo["repo"] / "lm" / "1" / "model.onnx", prompt, 32) == tokens[0].tolist()


def _ort_greedy(path, prompt, n_new):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
            for i in range(LAYERS) for kv in ("key", "value")}
    ids, total, out = prompt, prompt.shape[1], []
    pos = np.arange(total, dtype=np.int64)[None]
    for _ in range(n_new):
        res = sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                              "position_ids": pos, **past})
        out.append(int(res[0][0, -1].argmax()))
        past = dict(zip(past, res[1:]))
        ids, pos, total = np.array([[out[-1]]], np.int64), np.array([[total]], np.int64), total + 1
    return out


def test_an_empty_past_goes_through_triton(repo, server):
    """The prefill request carries past tensors of length 0 over both protocols."""
    import onnxruntime as ort

    from retool.serve.client import Control, infer

    Control(server.http_url).load("lm")
    ids = np.array([[5, 9, 2, 33, 7]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5)[None],
            **{f"past_key_values.{i}.{kv}": np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
               for i in range(LAYERS) for kv in ("key", "value")}}
    want = ort.InferenceSession(str(repo["fp32"]), providers=["CPUExecutionProvider"]).run(["logits", "present.1.value"],
                                                                                           feed)
    for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        got = infer(proto, url, "lm", feed, ["logits", "present.1.value"])
        assert got["present.1.value"].shape == (1, KV_HEADS, 5, HEAD_DIM)
        np.testing.assert_allclose(got["logits"], want[0], atol=1e-4)


def test_fp32_decoder_generates_through_triton_like_onnxruntime(repo, server):
    rep = _check(repo, server, "lm")
    (m,) = rep["models"]
    g = m["generation"]
    assert m["passed"] and g["passed"] and g["published_tokens"] and g["cases"][-1] == "left_padded"
    assert [p["protocol"] for p in g["protocols"]] == ["http", "grpc"]
    for p in g["protocols"]:
        assert p["steps"] == 224 and p["agreement"] == 224 and p["first_divergence"] is None  # 3 + 2 + 2 rows x 32
        assert p["max_logit_diff"] <= 1e-3 and p["min_cosine"] > 0.99999
        assert p["published_tokens"] == {"agreement": 224, "steps": 224, "first_divergence": None}
        assert "teacher_forced" not in p


def test_int4_decoder_passes_its_teacher_forced_gate_through_triton(repo, server):
    rep = _check(repo, server, "lm-int4")
    g = rep["models"][0]["generation"]
    assert g["passed"] and g["stored_reference"].startswith(repo["fp32"].name)
    assert g["gate"]["min_agreement"] == pytest.approx(31 / 32) and g["gate"]["free_running"] is False
    for p in g["protocols"]:
        tf = p["teacher_forced"]
        assert tf["steps"] == 96 and tf["agreement"] >= 93 and tf["min_cosine"] >= 0.98
        assert p["agreement"] == p["steps"]  # the server gives what onnxruntime gives for the same int4 file
        assert {c["name"] for c in p["checks"]} >= {"served_vs_onnxruntime", "published_tokens",
                                                    "generation:teacher_forced"}


def test_a_changed_served_model_fails_naming_the_first_divergent_step(repo, server):
    from fixtures.proc import run_retool

    r = run_retool("repo", "check", repo["repo"], "lm-broken", "--url", server.http_url, "--grpc-url",
                   server.grpc_url)
    assert r.returncode == 6, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    hit = re.search(r"lm-broken v1: greedy generation through Triton over http: (greedy\.\d|batch row \d|"
                    r"left_padded row \d) first differs at step (\d+) of 0\.\.31 \(served token \d+, reference "
                    r"\d+\) against the tokens stored at publish", lines[0])
    assert hit and int(hit.group(2)) == repo["diverge"], lines[0]  # where a plain onnxruntime loop diverges
    j = run_retool("repo", "check", repo["repo"], "lm-broken", "--url", server.http_url, "--grpc-url",
                   server.grpc_url, "--json")
    assert j.returncode == 6
    g = json.loads(j.stdout)["models"][0]["generation"]
    for p in g["protocols"]:
        # the server still equals onnxruntime on the same (changed) file: the serving stack is not to blame
        assert p["agreement"] == p["steps"] and not p["passed"]
        assert p["published_tokens"]["first_divergence"]["step"] == repo["diverge"]


def test_a_decoder_published_without_samples_is_still_checked_against_onnxruntime(repo, server):
    rep = _check(repo, server, "lm-old")
    g = rep["models"][0]["generation"]
    assert g["passed"] and not g["published_tokens"] and "compared with onnxruntime only" in g["note"]
    assert all(p["agreement"] == p["steps"] == 224 and "published_tokens" not in p for p in g["protocols"])


def test_gpt2_with_full_attention_heads_generates_through_triton(repo, server):
    g = _check(repo, server, "gpt2")["models"][0]["generation"]
    assert g["passed"] and all(p["agreement"] == p["steps"] == 224 for p in g["protocols"])


def test_a_stored_reference_of_another_vocabulary_is_one_clear_line(repo):
    """The served file's vocabulary differs from the reference stored at publish: a ValidationFailed
    naming both sizes, not a shape error from deep in the comparison."""
    from retool.errors import ValidationFailed
    from retool.publish import open_repo
    from retool.serve import decoder

    r = open_repo(str(repo["repo"]))
    man = r.manifest("lm-int4", 1)
    with np.load(repo["repo"] / "lm-int4" / "1" / "samples.npz") as z:
        data = {k: (z[k][..., :VOCAB - 8] if k.startswith("gen/ref.") and k.endswith(".logits") else z[k])
                for k in z.files}
    with pytest.raises(ValidationFailed, match=rf"vocabulary of {VOCAB}, the reference stored at publish "
                                                rf"{VOCAB - 8}.*repo verify"):
        decoder.check(None, r, "lm-int4", 1, man, {}, data, ())
