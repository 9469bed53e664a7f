"""The machine's GEMM limit with ONNX Runtime's own kernels: fp32 and u8s8 GOP/s on one GEMM.

A 512x1024 by 1024x1024 product (M x K x N, 2*M*K*N operations) as a one-node ONNX graph built
here: ``MatMul`` (fp32) and ``MatMulInteger`` (uint8 activations x int8 weights, int32 out, the
QGEMM every int8 MatMul / Conv of ORT ends in), weights as initializers so ORT prepacks them as it
does in a real model. Both run interleaved, ``threads`` intra-op threads; the figure is the median
with its spread, and int8 / fp32 as the paired speed-up with its 95 % interval (retool.speed).
Every latency ratio of the bench can be read against it: int8 cannot beat fp32 by more than this.

    python -m bench.gemm [THREADS] [BUDGET_S]      # prints the JSON
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

M, K, N = 512, 1024, 1024


def _graph(op: str):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if op == "MatMul":
        a_t, b = TensorProto.FLOAT, rng.standard_normal((K, N)).astype(np.float32)
        out_t, inputs = TensorProto.FLOAT, ["a", "b"]
    else:
        a_t, b = TensorProto.UINT8, rng.integers(-127, 128, (K, N)).astype(np.int8)
        out_t, inputs = TensorProto.INT32, ["a", "b", "a_zp"]
    inits = [numpy_helper.from_array(b, "b")]
    if op != "MatMul":
        inits.append(numpy_helper.from_array(np.array(128, np.uint8), "a_zp"))
    g = helper.make_graph([helper.make_node(op, inputs, ["y"])], f"gemm_{op}",
                          [helper.make_tensor_value_info("a", a_t, [M, K])],
                          [helper.make_tensor_value_info("y", out_t, [M, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def measure(threads: int = 1, budget_s: float = 3.0, min_rounds: int = 10) -> dict:
    import numpy as np

    from bench.stats import interleaved, summarize
    from retool.runtime import make_session
    from retool.speed import paired_ratio_interval

    rng = np.random.default_rng(1)
    feeds = {"fp32": {"a": rng.standard_normal((M, K)).astype(np.float32)},
             "u8s8": {"a": rng.integers(0, 256, (M, K)).astype(np.uint8)}}
    sess = {"fp32": make_session(_graph("MatMul"), threads=threads),
            "u8s8": make_session(_graph("MatMulInteger"), threads=threads)}
    times = interleaved({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sess.items()},
                        warmup=3, min_rounds=min_rounds, budget_s=budget_s)
    ops = 2.0 * M * K * N / 1e9
    est, lo, hi = paired_ratio_interval(times["fp32"], times["u8s8"])
    return {"shape_mkn": [M, K, N], "threads": threads, "ops": "MatMul (fp32), MatMulInteger (u8 x s8 -> s32)",
            "fp32_gops": summarize([ops / t for t in times["fp32"]], unit="GOP/s", better="higher", digits=2),
            "u8s8_gops": summarize([ops / t for t in times["u8s8"]], unit="GOP/s", better="higher", digits=2),
            "u8s8_speedup_over_fp32": {"estimate": round(est, 3), "ci95": [round(lo, 3), round(hi, 3)],
                                       "rounds": len(times["fp32"])}}


def limit(threads: int = 1, budget_s: float = 3.0, timeout: float = 300) -> dict:
    """:func:`measure` in a child process (the bench's parent never loads onnxruntime)."""
    from bench.proc import PY, child_failure, run_child

    r = run_child([PY, "-m", "bench.gemm", str(threads), str(budget_s)], timeout=timeout)
    got = r.last_json()
    return got if (r.ok and got) else child_failure(r, "GEMM limit")


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    threads = int(argv[0]) if argv else 1
    budget = float(argv[1]) if len(argv) > 1 else 3.0
    print(json.dumps(measure(threads, budget)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
