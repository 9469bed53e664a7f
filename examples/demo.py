"""`make demo`: the main job end to end on the bundled example models.

Builds one PyTorch, one Keras and one Caffe model, runs examples/pipelines/demo.yaml for the
`cpu` and `cpu-int8` targets into ./model-repo, serves every published model in a real Triton
(parity through the server, throughput within a p99 budget, the configuration chosen), prints the
summary, and checks that every published config.pbtxt parses with Triton's own schema.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "demo-out"))
    ap.add_argument("--repo", default=str(ROOT / "model-repo"), help="the model repository to publish into")
    # one worker: parallel jobs on a small machine would disturb each other's latency figures
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from examples.build_models import build

    print("• building the example models (seeded) …", flush=True)
    build()
    import dataclasses

    from retool.pipeline import run
    from retool.pipeline.config import load_config

    cfg = load_config(ROOT / "examples" / "pipelines" / "demo.yaml")
    repo = Path(args.repo).resolve()
    cfg = dataclasses.replace(cfg, models=tuple(dataclasses.replace(m, repository=str(repo)) for m in cfg.models))
    result = run(cfg, out=args.out, workers=args.workers)
    print()
    print(result.summary_md.read_text())
    configs = sorted(repo.glob("*/config.pbtxt"))
    try:
        from retool.publish.config import parse_with_triton_schema

        for c in configs:
            parse_with_triton_schema(c.read_text())
        print(f"{len(configs)} config.pbtxt file(s) in {repo} parse with Triton's model_config schema.")
    except ImportError as exc:
        print(f"(Triton schema check skipped: {exc})")
    served = [(o, o.stages["serve"]) for o in result.outcomes if (o.stages or {}).get("serve")]
    if served:
        print(f"\nServed in a real Triton ({served[0][1].get('server')}):")
    for o, s in served:
        par = (s.get("check") or {}).get("parity") or []
        worst = max((p.get("max_abs") or 0.0 for p in par), default=float("nan"))
        ch = (s.get("load") or {}).get("chosen")
        head = (f"  {o.published['name']} v{o.published['version']}: parity over http+grpc "
                f"{'PASS' if (s.get('check') or {}).get('passed') else 'FAIL'} (max diff {worst:.1e})")
        if ch:
            print(f"{head}; {ch['throughput']:.0f} infer/s at p99 {ch['p99_ms']:.1f} ms "
                  f"(budget {s['load']['budget_p99_ms']:g} ms) with {ch['label']}")
        else:
            print(f"{head}; {s.get('message') or 'no load test'}")
    print(f"reports: {args.out}/<model>/<target>/report/report.html; summary: {result.summary_md}")
    code_k8s = kserve_manifests(result, repo, Path(args.out))
    code, slower = forgive_slower(result.exit_code, result.outcomes)
    code = code or code_k8s
    for o in slower:
        # tiny models: int8's quantize/dequantize overhead can cost more than it saves. Refusing to
        # publish those is the not-slower gate doing its job, not a broken demo.
        print(f"{o.model}/{o.target}: {_decided(o)}, so the not-slower gate kept it out of the repository "
              f"(as intended: {o.message})")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s with exit code {code}"
          + (f" (the pipeline's was {result.exit_code})" if code != result.exit_code else ""))
    return code


def kserve_manifests(result, repo: Path, out: Path) -> int:
    """Each plan the pipeline made, as KServe manifests (validated offline; no cluster is applied to)."""
    import json

    from retool.cli import main as retool

    code = 0
    for p in json.loads(result.summary_json.read_text()).get("plans") or ():
        if p.get("status") != "ok" or not p.get("plan"):
            continue
        print(f"\nServing plan: {p['verdict']}")
        k8s = out / p["model"] / "k8s"
        # a local repository: the cluster reads the same content from where it is uploaded
        rc = retool(["deploy", "kserve", str(repo), p["chosen"]["model"], "--plan", p["plan"], "-o", str(k8s),
                     "--storage-uri", f"s3://models/{repo.name}", "--force"])
        if rc == 0:
            print(f"KServe manifests for {p['chosen']['replicas']} replica(s): {k8s} (kubectl apply -f {k8s}; "
                  f"docs/deploy.md: upload the repository to the storage URI first)")
        code = code or rc
    return code


def forgive_slower(code: int, outcomes) -> tuple[int, list]:
    """(exit code, targets forgiven): exit 6 becomes 0 when the only failures are quantized targets
    refused by the not-slower gate, and every other target is ok or cached (a rerun reuses them)."""
    slower = [o for o in outcomes if _only_slower(o)]
    if code == 6 and slower and all(o.status in ("ok", "cached") or o in slower for o in outcomes):
        return 0, slower
    return code, slower if code == 6 else []


def _decided(o) -> str:
    """The not-slower decision as the summary prints it (the same interval, the same words)."""
    from retool.speed import format_decision

    d = (((o.stages or {}).get("validate") or {}).get("summary") or {}).get("decision")
    return f"{format_decision(d)} against fp32" if d else "slower than fp32 here"


def _only_slower(o) -> bool:
    """Failed on the not-slower gate of a quantized target and on nothing else."""
    msg = o.message or ""
    if o.status != "failed" or not msg.startswith("gate failed: "):
        return False
    return all(g.strip().startswith("not-slower@") for g in msg[len("gate failed: "):].split(","))


if __name__ == "__main__":
    sys.exit(main())
