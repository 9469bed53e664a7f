"""perf_analyzer says "use a larger time window" when no request completes inside one: run_point widens the
window and measures, instead of rejecting the model (a slow variant was refused by the plan this way)."""
from __future__ import annotations

import pytest

from fixtures.onnx_speed import slow_int8
from retool.publish import publish
from retool.serve import loadtest as lt
from retool.serve.session import open_session


@pytest.mark.slow
def test_a_request_longer_than_the_window_widens_it(tmp_path):
    publish(slow_int8(tmp_path / "slow.onnx", depth=512, width=1024), tmp_path / "repo", "slow",
            max_regression="off")  # one request: about 40 ms through Triton (128 deep: 11 ms), over a 20 ms window
    with open_session(str(tmp_path / "repo")) as sess:
        sess.load("slow")
        p = lt.run_point("slow", sess.grpc_url, concurrency=1, window_ms=20)
    assert p.throughput > 0 and p.p99_ms > 20
