"""Which nodes run on which execution provider, read from an onnxruntime profile.

The profile lists every node ORT actually executed (after its graph
optimisations and fusions) with the provider that ran it, so a model that
silently falls back to the CPU for some operators shows it here.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from retool.procs import temp_dir

#: Nodes listed one by one in the report at most (the counts cover all of them).
MAX_NODES_LISTED = 200


def node_placement(model_path, feeds: Mapping[str, np.ndarray], threads: int | None = None,
                   providers: Sequence[str] | None = None) -> dict:
    """Run ``model_path`` once with profiling on; count nodes per provider and operator type."""
    import onnxruntime as ort

    from retool.runtime import session_options

    available = ort.get_available_providers()
    requested = list(providers or ["CPUExecutionProvider"])
    chosen = [p for p in requested if p in available] or ["CPUExecutionProvider"]
    with temp_dir("profile") as d:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(d) / "profile")
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=chosen)
        names = {i.name for i in sess.get_inputs()}
        sess.run(None, {k: v for k, v in feeds.items() if k in names})
        profile = Path(sess.end_profiling())
        events = json.loads(profile.read_text())
        session_providers = sess.get_providers()
        del sess
    nodes: dict[str, dict] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") != "Node" or "provider" not in args:
            continue
        name = ev.get("name", "")
        for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        nodes.setdefault(name, {"node": name, "op_type": args.get("op_name", ""), "provider": args["provider"]})
    per_provider = Counter(n["provider"] for n in nodes.values())
    ops: dict[str, Counter] = {}
    for n in nodes.values():
        ops.setdefault(n["provider"], Counter())[n["op_type"]] += 1
    listed = sorted(nodes.values(), key=lambda n: (n["provider"], n["op_type"], n["node"]))
    return {
        "method": "onnxruntime profiling (one run)",
        "requested": requested,
        "available": list(available),
        "session": list(session_providers),
        "nodes_total": len(nodes),
        "nodes_per_provider": dict(per_provider),
        "ops_per_provider": {p: dict(sorted(c.items())) for p, c in ops.items()},
        "nodes": listed[:MAX_NODES_LISTED],
        "nodes_truncated": len(listed) > MAX_NODES_LISTED,
        "unplaced_requested": [p for p in chosen if p not in per_provider and p != "CPUExecutionProvider"],
    }
