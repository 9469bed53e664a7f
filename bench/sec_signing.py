"""Signing and verifying a large model (issue 25's figure), each figure from its own child process.

On the same 2.2 GB model (the large_model section's wide MLP): ``retool publish`` with and without
``--sign-key``, then, on the signed repository, a plain sha256 of the version's files once (the baseline),
``retool repo verify`` and ``retool repo verify --require-signature --trust-key``. Wall time and peak
RSS of each; the ratios verify / hash-once are paired per round (rounds rotate the order) and summarised
over the rounds. Goal: signed verification <= 1.2 x hashing the files once, judged by the one rule (the 95 % paired
bootstrap interval of verify --trust-key / hash once, 5 rounds by default).

``large_model`` measures it on its torch-converted model; the ``signing`` section alone writes the same
MLP straight as ONNX (numpy weights, seeded; no torch), so the figure costs a minute, not a conversion.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench.machine import room_for
from bench.models import LARGE_DEPTH, LARGE_WIDTH, MLP_IN, MLP_OUT, mlp_param_count
from bench.proc import PY, ChildResult, child_failure, retool_cmd, run_child
from bench.stats import fmt_metric, ratio_summary, summarize
from retool.fsutil import HASH_SCRIPT

GOAL = 1.2
MIB = 2**20

#: The wide MLP as ONNX: Gemm+Relu layers whose weights go straight into one external-data file, a layer
#: at a time (no second copy of 2.2 GB in memory). Uniform(-1/sqrt(in), 1/sqrt(in)) weights, seed 0.
BUILD = """
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper
width, depth, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = path + ".data"
rng = np.random.default_rng(0)
dims = [{mlp_in}] + [width] * (depth + 1) + [{mlp_out}]
inits, nodes, offset = [], [], 0
with open(data, "wb") as fh:
    def put(name, arr):
        global offset
        pad = -offset % 4096
        fh.write(b"\\0" * pad)
        offset += pad
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        fh.write(raw)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape),
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", data.rsplit("/", 1)[-1]), ("offset", str(offset)), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        offset += len(raw)
        inits.append(t)
    x = "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        bound = np.float32(1.0 / np.sqrt(a))
        put(f"w{{i}}", (rng.random((a, b), dtype=np.float32) * 2 - 1) * bound)
        put(f"b{{i}}", (rng.random((b,), dtype=np.float32) * 2 - 1) * bound)
        y = "scores" if i == len(dims) - 2 else f"h{{i}}"
        nodes.append(helper.make_node("Gemm", [x, f"w{{i}}", f"b{{i}}"], [y if y == "scores" else y + "_pre"]))
        if y != "scores":
            nodes.append(helper.make_node("Relu", [y + "_pre"], [y]))
        x = y
graph = helper.make_graph(nodes, "wide_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", {mlp_in}])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", {mlp_out}])], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="retool-bench")
model.ir_version = 8
onnx.save_model(model, path)
"""

#: The baseline: each file read once through sha256 by the same script retool's verify runs in its child
#: (``fsutil.HASH_SCRIPT``: 16 MiB ``readinto``), so the ratio is verification's overhead, not a read loop.
HASH = HASH_SCRIPT

KEYGEN = """
import sys
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], "wb").write(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
open(sys.argv[2], "wb").write(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
"""


def _figure(runs: list[ChildResult]) -> dict:
    return {"wall": summarize([r.wall_s for r in runs]),
            "peak_rss_mib": summarize([r.maxrss_bytes / MIB for r in runs], unit="MiB")}


def sign_and_verify(model: Path, work: Path, repeats: int = 3) -> dict:
    """The figures for ``model`` (an ONNX file, external data beside it); ``work`` is emptied and removed."""
    size = sum(p.stat().st_size for p in model.parent.iterdir() if p.name.startswith(model.name))
    res: dict = {"model_size_bytes": size, "repeats": repeats, "goal_verify_over_hash_once": GOAL}
    why = room_for(model.parent, 2 * size + (1 << 30), size + (2 << 30), "a signed and an unsigned repository",
                   "the signing figures")
    if why:
        return {**res, "status": "skipped", "reason": why}
    work.mkdir(parents=True, exist_ok=True)
    try:
        key, pub = work / "key.pem", work / "key.pub.pem"
        r = run_child([PY, "-c", KEYGEN, key, pub], timeout=120)
        if not r.ok:
            return {**res, **child_failure(r, "making an EC key")}
        runs: dict[str, list[ChildResult]] = {k: [] for k in ("publish", "publish_signed", "hash_once", "verify",
                                                               "verify_signed")}
        loads = []
        signed_repo = work / "signed"
        for i in range(repeats):
            loads.append(round(os.getloadavg()[0], 2))
            print(f"   round {i + 1}/{repeats}: publish, publish --sign-key", flush=True)
            order = [("publish", work / "plain", []), ("publish_signed", signed_repo, ["--sign-key", str(key)])]
            for label, repo, extra in order if i % 2 == 0 else order[::-1]:
                shutil.rmtree(repo, ignore_errors=True)
                r = run_child(retool_cmd() + ["publish", str(model), "--repo", str(repo), "--name", "big", *extra],
                              timeout=1800)
                if not r.ok:
                    return {**res, **child_failure(r, f"retool {label.replace('_', ' --sign-key ')}")}
                runs[label].append(r)
            shutil.rmtree(work / "plain", ignore_errors=True)
            version = signed_repo / "big" / "1"
            files = sorted(str(p) for p in version.rglob("*") if p.is_file() and p.name != "model.sig")
            trio = [("hash_once", [PY, "-c", HASH, *files]),
                    ("verify", retool_cmd() + ["repo", "verify", str(signed_repo)]),
                    ("verify_signed", retool_cmd() + ["repo", "verify", str(signed_repo), "--require-signature",
                                                      "--trust-key", str(pub)])]
            # the publishes just wrote 4.4 GB: flush them now, or their write-back runs beside the timings
            os.sync()
            if i == 0:  # the files were just written: read them once so every round starts alike
                run_child(trio[0][1], timeout=600)
            print(f"   round {i + 1}/{repeats}: hash once, repo verify, repo verify --trust-key", flush=True)
            k = i % len(trio)
            for label, cmd in trio[k:] + trio[:k]:
                r = run_child(cmd, timeout=1800)
                if not r.ok:
                    return {**res, **child_failure(r, label.replace("_", " "))}
                runs[label].append(r)
        res["files_hashed"] = [Path(f).name for f in files]
        res.update({k: _figure(v) for k, v in runs.items()})
        walls = {k: [r.wall_s for r in v] for k, v in runs.items()}
        res["verify_signed_over_hash_once"] = ratio_summary(walls["verify_signed"], walls["hash_once"])
        res["verify_over_hash_once"] = ratio_summary(walls["verify"], walls["hash_once"])
        res["publish_signed_over_publish"] = ratio_summary(walls["publish_signed"], walls["publish"])
        from retool.speed import decide_ratio

        # the one rule: pass only when the whole 95 % interval of the paired ratio is within the goal
        goal = decide_ratio(walls["verify_signed"], walls["hash_once"], GOAL, higher_is_better=False)
        res["goal_decision"] = goal.to_dict()
        res["meets_goal"] = {"pass": True, "fail": False}.get(goal.outcome)  # None: undecided
        res["loadavg_1m_per_round"] = loads + [round(os.getloadavg()[0], 2)]
        res["status"] = "ok"
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def signing(settings: dict, work: Path) -> dict:
    """The section alone: the wide MLP written straight as ONNX, then ``sign_and_verify``."""
    spec = settings.get("large_mlp")
    width, depth = (int(v) for v in spec.split("x")) if spec else (LARGE_WIDTH, LARGE_DEPTH)
    expect = mlp_param_count(width, depth) * 4
    res: dict = {"model": f"wide MLP {MLP_IN} -> {depth + 1} x {width} -> {MLP_OUT} (ONNX written directly)"}
    work.mkdir(parents=True, exist_ok=True)
    why = room_for(work, 3 * expect + (1 << 30), expect + (2 << 30), "the model and two repositories", "signing")
    if why:
        return {**res, "status": "skipped", "reason": why}
    try:
        src = work / "model"
        src.mkdir()
        model = src / "wide_mlp.onnx"
        print(f"   writing the {expect / 1e9:.2f} GB MLP as ONNX", flush=True)
        r = run_child([PY, "-c", BUILD.format(mlp_in=MLP_IN, mlp_out=MLP_OUT), str(width), str(depth), str(model)],
                      timeout=1800)
        if not r.ok:
            return {**res, **child_failure(r, "writing the ONNX MLP")}
        return {**res, **sign_and_verify(model, work / "figures", settings.get("signing_repeats", 5))}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _goal(d: dict) -> str:
    word = {True: "yes", False: "NO"}.get(d.get("meets_goal"), "undecided")
    text = (d.get("goal_decision") or {}).get("text")
    return f"{word} (verify --trust-key / hash once: {text})" if text else word


def render(d: dict) -> str:
    from retool.console import table

    def _m(metric, fmt):
        return fmt_metric(metric, fmt)

    def _table(headers, rows):
        return table(headers, [[str(c) for c in r] for r in rows])

    head = (f"{d.get('model', '')}: {d.get('model_size_bytes', 0) / 1e9:.2f} GB, {d.get('repeats')} rounds; goal "
            f"verify --trust-key <= {d.get('goal_verify_over_hash_once')} x hashing the files once")
    rows = [[k.replace("_", " "), _m((d.get(k) or {}).get("wall"), "{:.2f}"),
             _m((d.get(k) or {}).get("peak_rss_mib"), "{:.0f}")]
            for k in ("hash_once", "verify", "verify_signed", "publish", "publish_signed") if d.get(k)]
    ratios = [[k.replace("_", " "), _m(d.get(k), "{:.2f}")]
              for k in ("verify_signed_over_hash_once", "verify_over_hash_once", "publish_signed_over_publish")
              if d.get(k)]
    return "\n".join([head, _table(["figure", "wall s", "peak RSS MiB"], rows), _table(["ratio", "median [IQR]"], ratios),
                      f"meets goal: {_goal(d)}; load (1 min) per round: "
                      f"{d.get('loadavg_1m_per_round')}"])
