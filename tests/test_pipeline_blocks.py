"""A pipeline's progress reads as one block per job (issue 26): a job starts only after the driver has
finished the one before it, its publish included, and a model's targets run before the next model's
convert. Two real ONNX models, one target each, published to a real repository."""
from __future__ import annotations

import pytest
import yaml

from fixtures import onnx_models


def _job(line: str) -> str:
    """'• lin-a/cpu: timing batch 1 … done' -> 'lin-a/cpu'."""
    return line[2:].split(":", 1)[0]


@pytest.mark.slow
def test_each_jobs_lines_publish_included_are_one_block(tmp_path, capfd):
    import retool

    models = []
    for i, name in enumerate(("lin-a", "lin-b")):
        src = onnx_models.linear(tmp_path / f"{name}.onnx", seed=i + 1)
        models.append({"name": name, "source": str(src), "targets": ["cpu"]})
    cfg = tmp_path / "retool.yaml"
    cfg.write_text(yaml.safe_dump({
        "version": 1, "repository": str(tmp_path / "repo"),
        "defaults": {"validation": {"batch_sizes": [1], "threads": 1, "latency": True, "runs": 5},
                     "gates": {"not_slower": False}},
        "models": models}, sort_keys=False))
    result = retool.run(cfg, out=tmp_path / "out", workers=1)
    err = capfd.readouterr().err
    assert result.exit_code == 0, err
    assert [o.published["version"] for o in result.outcomes] == [1, 1]
    steps = [ln for ln in err.splitlines() if ln.startswith("• ")]
    jobs = [_job(ln) for ln in steps]
    # each job's lines are contiguous, and so are each model's (convert, then its target)
    blocks = [j for k, j in enumerate(jobs) if k == 0 or jobs[k - 1] != j]
    assert blocks == ["lin-a", "lin-a/cpu", "lin-b", "lin-b/cpu"], "\n".join(steps)
    for name in ("lin-a", "lin-b"):
        mine = [ln for ln in steps if _job(ln) == f"{name}/cpu"]
        staging = [k for k, ln in enumerate(mine) if ": staging " in ln]
        # the publish step is inside the target's block: after it started, before its verdict
        assert mine[0] == f"• {name}/cpu: target started", mine
        assert staging and 0 < staging[0] < len(mine) - 1 and mine[-1] == f"• {name}/cpu: ok", mine
