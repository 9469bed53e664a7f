"""Encoder-decoders served by a real Triton (issue 23): the decoder and its encoder are two models;
``retool repo check`` runs greedy generation through both (one encoder request per case, one decoder
request per token) over HTTP and gRPC, against onnxruntime in-process and the tokens stored at publish."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tritonclient")
pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    import onnx

    from fixtures import hf_frontier
    from retool.converter.hf.seq2seq import companion_paths
    from retool.publish import publish

    root = tmp_path_factory.mktemp("serve-seq2seq")
    repo = root / "repo"
    for fam in ("t5", "bart"):
        _, dec, _ = hf_frontier.converted_seq2seq(tmp_path_factory, fam)
        publish(companion_paths(dec)[0], repo, f"{fam}-encoder", max_regression="off")
        publish(dec, repo, fam, max_regression="off")
    # BART's served encoder changes after publish: the weights of its last layer are negated
    path = repo / "bart-encoder" / "1" / "model.onnx"
    m = onnx.load(str(path))
    hit = [i for i in m.graph.initializer if "encoder.layers.1." in i.name and i.data_type == onnx.TensorProto.FLOAT]
    assert hit, [i.name for i in m.graph.initializer]
    for init in hit:
        init.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(init), init.name))
    onnx.save(m, str(path))
    alone = root / "alone"
    publish(hf_frontier.converted_seq2seq(tmp_path_factory, "t5")[1], alone, "t5", max_regression="off")
    return {"repo": repo, "alone": alone}


@pytest.fixture(scope="module")
def server(repo):
    from retool.serve.server import TritonServer

    with TritonServer(repo["repo"]) as srv:
        yield srv


def _check(repo, server, name):
    from retool.serve.check import check

    return check(str(repo["repo"]), name, url=server.http_url, grpc_url=server.grpc_url)


def test_publish_stores_tokens_with_the_encoder(repo):
    from retool.publish import open_repo

    r = open_repo(repo["repo"])
    man = r.manifest("t5", 1)
    assert man["samples"]["kind"] == "seq2seq"
    assert man["samples"]["seq2seq"]["cases"] == ["greedy.0", "greedy.1", "greedy.2", "batch", "padded"]
    assert man["samples"]["seq2seq"]["encoder_sha256"] == r.manifest("t5-encoder", 1)["artifact"]["sha256"]
    cfg = (repo["repo"] / "t5" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in cfg and "past_key_values.0.encoder.key" in cfg


def test_repo_check_generates_through_triton(repo, server):
    from retool.serve.check import render

    report = _check(repo, server, "t5")
    m = report["models"][0]
    g = m["seq2seq"]
    assert m["passed"] and g["encoder"] == {"model": "t5-encoder", "version": 1} and g["published_tokens"]
    assert [p["protocol"] for p in g["protocols"]] == ["http", "grpc"]
    for p in g["protocols"]:
        assert p["agreement"] == p["steps"] == 7 * 16 and p["max_logit_diff"] <= 1e-3
    text = render(report)
    assert "with encoder t5-encoder v1" in text and "PASS" in text


def test_a_changed_encoder_fails_against_the_published_tokens(repo, server):
    from retool.errors import ValidationFailed

    with pytest.raises(ValidationFailed) as exc:
        _check(repo, server, "bart")
    assert "published" in str(exc.value) and "repo verify" in str(exc.value)
    g = exc.value.report["models"][0]["seq2seq"]
    names = {c["name"]: c["passed"] for c in g["protocols"][0]["checks"]}
    assert names == {"served_vs_onnxruntime": True, "published_tokens": False}


def test_decoder_without_its_encoder_is_named(repo):
    from retool.errors import ValidationFailed
    from retool.publish import open_repo
    from retool.serve.seq2seq import find_encoder

    r = open_repo(repo["alone"])
    with pytest.raises(ValidationFailed, match="its encoder .* is not published .* retool publish NAME.encoder.onnx"):
        find_encoder(r, "t5", r.manifest("t5", 1))
