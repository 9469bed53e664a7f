"""Run a pipeline: convert each model once, then optimise, validate and publish per target."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from retool import console
from retool.errors import UsageError
from retool.fsutil import atomic_write_text
from retool.pipeline.cache import StepCache, digest_of_path, digest_of_source, step_key
from retool.pipeline.config import ModelConfig, PipelineConfig, TargetConfig, load_config, parse_config
from retool.types import jsonable, now_iso


@dataclass(frozen=True)
class TargetOutcome:
    model: str
    target: str
    status: str  # ok | cached | failed | skipped
    code: int = 0
    message: str = ""
    stages: Mapping[str, Any] = field(default_factory=dict)
    published: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RunResult:
    outcomes: tuple[TargetOutcome, ...]
    converts: Mapping[str, Mapping[str, Any]]
    exit_code: int
    out_dir: Path
    summary_md: Path
    summary_json: Path

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


def worst_code(codes) -> int:
    """A bug (1) outranks everything; otherwise the highest code wins."""
    codes = [c for c in codes if c]
    if not codes:
        return 0
    return 1 if 1 in codes else max(codes)


def run(config, *, out: str | Path = "retool-out", only: str | None = None, engine: str = "local",
        workers: int = 1, ray_address: str | None = None, fail_fast: bool = False, use_cache: bool = True,
        seed: int = 0) -> RunResult:
    """Run a pipeline file (path) or config (dict / PipelineConfig). Returns a RunResult; the
    exit code reflects the worst outcome. Never raises for a failing model: see the outcomes."""
    if isinstance(config, PipelineConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = parse_config(dict(config), "<config>", base_dir=Path.cwd())
    else:
        cfg = load_config(config)
    models = list(cfg.models)
    if only:
        wanted = {t.strip() for t in only.split(",")}
        known = {t.name for m in models for t in m.targets}
        unknown = wanted - known
        if unknown:
            raise UsageError(f"--only {only}: no model has target(s) {sorted(unknown)}; known: {sorted(known)}")
        models = [dataclasses.replace(m, targets=tuple(t for t in m.targets if t.name in wanted)) for m in models]
    from retool.refs import ensure_importable, package_root

    roots = {r for r in (package_root(m.source, cfg.base_dir) for m in models) if r}
    # `module:factory` sources resolve like `python -m`, and from the pipeline file's folder (or a parent)
    ensure_importable(*sorted(roots), cfg.base_dir, Path.cwd())
    if engine == "ray" and ray_address:  # a wrong address fails before --out is created
        from retool.pipeline.engines import _probe_ray_address

        _probe_ray_address(ray_address)
    out_dir = _output_folder(out)
    cache = StepCache(out_dir / ".cache", enabled=use_cache)
    return _Scheduler(cfg, models, out_dir, cache, engine, workers, ray_address, fail_fast, seed).run()


def _output_folder(out) -> Path:
    """``--out`` resolved, created and proven writable, or one UsageError naming it (nothing left behind)."""
    import os
    import shutil
    import tempfile

    out_dir = Path(out).expanduser().resolve()
    new = out_dir  # the topmost folder this call creates, removed again if the folder is unusable
    while not new.parent.exists() and new.parent != new:
        new = new.parent
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = "is a file" if blocker == out_dir else f"is inside {blocker}, which is a file"
        raise UsageError(f"--out {out}: {what}, not a folder; choose a folder for the pipeline's outputs")
    created = not new.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".retool-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            shutil.rmtree(new, ignore_errors=True)
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose another --out") from None
    return out_dir


def _latest_version(repo, name: str) -> tuple[int, str] | None:
    """(version, model sha256) of the newest published version, if any."""
    from retool.errors import UsageError as _Missing

    try:
        if name not in repo.models():
            return None
    except _Missing:  # the repository does not exist yet
        return None
    versions = repo.versions(name)
    if not versions:
        return None
    man = repo.manifest(name, versions[-1])
    return versions[-1], (man.get("artifact") or {}).get("sha256")


class _Scheduler:
    def __init__(self, cfg, models, out_dir, cache, engine, workers, ray_address, fail_fast, seed):
        self.cfg, self.models, self.out_dir, self.cache = cfg, models, out_dir, cache
        self.engine_name, self.workers, self.ray_address = engine, workers, ray_address
        self.fail_fast, self.seed = fail_fast, seed
        self.base = str(cfg.base_dir)
        self.converts: dict[str, dict] = {}
        self.outcomes: dict[tuple[str, str], TargetOutcome] = {}
        self.keys: dict[tuple[str, str], str] = {}
        self.opt_keys: dict[tuple[str, str], str] = {}
        #: (model, repository, model sha256) -> what publish answered: one artifact, one published name
        self.by_bytes: dict[tuple[str, str, str], dict] = {}

    def _engine(self):
        from retool.pipeline.engines import LocalEngine, RayEngine

        if self.engine_name == "local":
            return LocalEngine(self.workers)
        if self.engine_name == "ray":
            return RayEngine(self.ray_address, str(self.out_dir), self.workers)
        raise UsageError(f"--engine {self.engine_name}: choose local or ray")

    # -- cache keys ----------------------------------------------------------------------------
    def _convert_key(self, m: ModelConfig) -> str:
        base = Path(self.base)
        return step_key("convert", {
            "source": digest_of_source(m.source, base), "weights": digest_of_path(m.weights, base),
            "examples": digest_of_path(m.example_inputs, base), "framework": m.framework,
            "inputs": list(m.inputs), "opset": m.opset, "options": dict(m.options), "seed": self.seed})

    def _optimize_key(self, m: ModelConfig, t: TargetConfig, fp32_sha: str) -> str:
        cal = dict(t.calibration)
        return step_key("optimize", {
            "fp32": fp32_sha, "target": t.name, "tolerance": dict(t.tolerance), "accuracy": t.accuracy,
            "calibration": {**cal, "data": digest_of_path(cal.get("data"), Path(self.base))}, "seed": self.seed})

    def _target_key(self, m: ModelConfig, t: TargetConfig, fp32_sha: str) -> str:
        """Optimise + validate: a change of gates or validation settings re-validates only."""
        return step_key("target", {"optimize": self._optimize_key(m, t, fp32_sha), "gates": dict(t.gates),
                                   "validation": dict(m.validation), "seed": self.seed})

    # -- scheduling ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        with console.whole_lines():  # workers share our stderr: a line left open would catch theirs
            return self._run()

    def _run(self) -> RunResult:
        from retool.pipeline.engines import WorkerDied
        from retool.pipeline.jobs import convert_job, target_job

        engine = None
        pending: dict[Any, tuple] = {}
        #: jobs ready to run, in the order they start: a model's next target before the next model's convert
        ready: list[tuple] = []
        t_start = time.perf_counter()

        def submit(kind, m, ti, attempt=0):
            reuse = None
            if kind == "convert":
                key = self._convert_key(m)
                hit = self.cache.get(key)
                if hit:
                    console.info(f"• {m.name}: convert cached")
                    self.converts[m.name] = {**hit["result"], "status": "cached"}
                    return after_convert(m)
                args = (convert_job, m, self.base, str(self.out_dir), self.seed)
            else:
                t = m.targets[ti]
                fp32 = self.converts[m.name]
                key = self._target_key(m, t, fp32["sha256"])
                self.keys[(m.name, t.name)] = key
                hit = self.cache.get(key)
                if hit:  # finish_target says "cached", once
                    return finish_target(m, ti, {**hit["result"], "_cached": True})
                opt_key = self._optimize_key(m, t, fp32["sha256"])
                self.opt_keys[(m.name, t.name)] = opt_key
                opt_hit = self.cache.get(opt_key)
                reuse = opt_hit["result"]["optimize"] if opt_hit else None
                args = (target_job, m, t, fp32["path"], self.base, str(self.out_dir), self.seed, reuse)
            job = (kind, m, ti, attempt, args, reuse)
            if kind == "convert" and not attempt:
                ready.append(job)
            else:  # depth first: a model already started goes on (or retries) before another model starts
                ready.insert(0, job)

        def start_ready():
            """Start ready jobs while a local worker is free. A job starts only after the driver finished the
            one before it (its publish included), so each job's lines stay one block on stderr."""
            nonlocal engine
            limit = self.workers if self.engine_name == "local" else len(ready) + len(pending)
            while ready and len(pending) < limit and not stopping[0]:
                kind, m, ti, attempt, args, reuse = ready.pop(0)
                engine = engine or self._engine()
                if self.engine_name != "local":  # a local job says "started" itself, when it really starts
                    console.info(f"• {m.name}{'' if kind == 'convert' else '/' + m.targets[ti].name}: "
                                 f"{kind} submitted")
                extra = {}
                if self.engine_name == "ray" and kind == "target":
                    extra["files_in"] = self._files_for(m, m.targets[ti] if reuse else None)
                fut = engine.submit(*args, **extra)
                pending[fut] = (kind, m, ti, attempt)

        def after_convert(m):
            res = self.converts[m.name]
            if res.get("status") in ("ok", "cached") and m.targets:
                submit("target", m, 0)
            elif res.get("status") == "failed":
                for t in m.targets:
                    self.outcomes[(m.name, t.name)] = TargetOutcome(m.name, t.name, "skipped", 0,
                                                                    "conversion failed")
                if self.fail_fast:
                    stop_all()

        def finish_target(m, ti, res):
            t = m.targets[ti]
            cached = res.pop("_cached", False)
            stages = {k: v for k, v in res.items() if isinstance(v, dict)}
            failed = [s for s in stages.values() if s.get("status") == "failed"]
            published = None
            # `publish: {when: always}` publishes a model whose gates failed too, recorded as forced
            only_gates = bool(failed) and all(s.get("code") == 6 for s in failed)
            if not failed or (only_gates and t.publish.get("when") == "always"):
                with console.labelled(f"{m.name}/{t.name}"):
                    published = self._publish(m, t, stages)
                if published and published.get("status") == "failed":
                    failed = failed + [published]
            status = "failed" if failed else ("cached" if cached else "ok")
            code = failed[0]["code"] if failed else 0
            msg = failed[0]["message"] if failed else ""
            self.outcomes[(m.name, t.name)] = TargetOutcome(m.name, t.name, status, code, msg, stages, published)
            if not failed and not cached:
                outs = [v[k] for v in stages.values() for k in ("path", "report") if v.get(k)]
                outs += [p for v in stages.values() for p in v.get("reports", [])]
                self.cache.put(self.keys[(m.name, t.name)], res, outs)
            opt = stages.get("optimize", {})
            if not cached and opt.get("status") == "ok":  # even when a gate failed: a later run re-validates only
                self.cache.put(self.opt_keys[(m.name, t.name)], {"optimize": opt}, [opt["path"], opt["report"]])
            console.info(f"• {m.name}/{t.name}: {status}{': ' + msg if msg else ''}")
            if failed:
                for rest in m.targets[ti + 1:]:  # a model stops at its first failed gate
                    self.outcomes[(m.name, rest.name)] = TargetOutcome(
                        m.name, rest.name, "skipped", 0, f"stopped after {t.name} failed")
                if self.fail_fast:
                    stop_all()
            elif ti + 1 < len(m.targets):
                submit("target", m, ti + 1)

        def stop_all():
            ready.clear()
            for fut, (kind, m, ti, _) in list(pending.items()):
                engine.cancel(fut)
                pending.pop(fut)
                names = [t.name for t in m.targets] if kind == "convert" else [t.name for t in m.targets[ti:]]
                for n in names:
                    self.outcomes.setdefault((m.name, n), TargetOutcome(m.name, n, "skipped", 0, "--fail-fast"))
            for m in self.models:
                for t in m.targets:
                    self.outcomes.setdefault((m.name, t.name), TargetOutcome(m.name, t.name, "skipped", 0,
                                                                             "--fail-fast"))
            stopping[0] = True

        stopping = [False]
        try:
            for m in self.models:
                if stopping[0]:
                    break
                submit("convert", m, None)
            start_ready()
            while pending:
                for fut in engine.wait_any(pending):
                    if fut not in pending:
                        continue
                    kind, m, ti, attempt = pending.pop(fut)
                    try:
                        res = engine.result(fut)
                    except WorkerDied as exc:
                        if attempt < 1 and self.engine_name == "local":
                            console.warn(f"{m.name}: worker died ({exc}); retrying once")
                            submit(kind, m, ti, attempt + 1)
                            continue
                        res = {"stage": kind, "status": "failed", "code": 1,
                               "message": f"worker died twice: {exc}"}
                        if kind == "target":
                            res = {"worker": res}
                    if kind == "convert":
                        self.converts[m.name] = res
                        if res.get("status") == "ok":
                            self.cache.put(self._convert_key(m), res, [res["path"], res["report"]])
                        console.info(f"• {m.name}: convert {res.get('status')}"
                                     f"{': ' + res.get('message') if res.get('message') else ''}")
                        after_convert(m)
                    else:
                        finish_target(m, ti, res)
                start_ready()  # after this job's lines (and its publish): the next job's come after them
        finally:
            if engine is not None:
                engine.close()
        return self._finish(time.perf_counter() - t_start)

    def _files_for(self, m: ModelConfig, reused: TargetConfig | None = None) -> dict:
        """The files a Ray task needs: the fp32 model, and a reused optimised model."""
        d = self.out_dir / m.name
        paths = [d / "fp32.onnx", d / "fp32.report.json"]
        if reused is not None:
            paths += [d / reused.name / "model.onnx", d / reused.name / "model.report.json"]
        return {str(p.relative_to(self.out_dir)): p.read_bytes() for p in paths if p.exists()}

    def _publish(self, m: ModelConfig, t: TargetConfig, stages: Mapping) -> dict | None:
        rules = dict(t.publish)
        when = rules.get("when", "gates-pass")
        repo = rules.get("repository") or m.repository
        if when == "never" or not repo:
            return None
        val = stages.get("validate", {})
        if when == "gates-pass" and not val.get("passed"):
            return {"status": "skipped", "message": "gates did not pass"}
        from retool.errors import RetoolError
        from retool.publish import open_repo, publish

        force = bool(rules.get("force", False)) or (when == "always" and not val.get("passed"))

        name = rules.get("name") or f"{m.name}-{t.name}"  # one repository model per target
        repo_url = repo if "://" in repo else str((Path(self.base) / repo).resolve())
        opt = stages["optimize"]
        same = self.by_bytes.get((m.name, repo_url, opt["sha256"]))
        if same and same["name"] != name:  # e.g. cpu-auto chose cpu: point at it, no second copy
            return {"status": "same", "repository": repo_url, "name": same["name"], "version": same["version"],
                    "same_as": same["target"],
                    "message": f"same file as {same['name']} v{same['version']} (not published twice)"}
        sign = {k: str(Path(self.base) / os.path.expandvars(v))  # $RUNNER_TEMP/key.pem from a CI secret
                for k, v in (rules.get("signing") or {}).items()}
        try:
            latest = _latest_version(open_repo(repo_url), name)
            if latest and latest[1] == opt["sha256"]:  # a re-run publishes nothing new
                out = {"status": "ok", "repository": repo_url, "name": name, "version": latest[0],
                       "alias": rules.get("alias"), "note": "already published"}
            else:
                res = publish(opt["path"], repo_url, name, report=val.get("report"),
                              force=force, alias=rules.get("alias"), sign_key=sign.get("key"), sign_cert=sign.get("cert"),
                              samples_reference=self.converts.get(m.name, {}).get("path"))  # fp32 outputs for checks
                out = {"status": "ok", "repository": repo_url, "name": name, "version": res.version,
                       "alias": rules.get("alias")}
        except RetoolError as exc:
            return {"status": "failed", "code": exc.exit_code, "message": str(exc)}
        out.update({"signing": sign} if sign else {})  # the serve step signs its config revisions with it
        self.by_bytes.setdefault((m.name, repo_url, opt["sha256"]), {**out, "target": t.name})
        return out

    # -- reporting -----------------------------------------------------------------------------
    def _finish(self, seconds: float) -> RunResult:
        from retool.pipeline.serve_step import plan_models, plan_section, serve_published, summary_section
        from retool.pipeline.summary import render_summary

        outcomes = []
        for m in self.models:
            for t in m.targets:
                outcomes.append(self.outcomes.get((m.name, t.name),
                                                  TargetOutcome(m.name, t.name, "skipped", 0, "not run")))
        t_serve = time.perf_counter()
        outcomes = serve_published(self.models, outcomes, self.out_dir)  # after every job: the CPUs are free
        plans = plan_models(self.models, outcomes, self.out_dir)
        seconds += time.perf_counter() - t_serve  # the run's time includes serving and the plans
        codes = ([o.code for o in outcomes] + [c.get("code", 0) for c in self.converts.values()]
                 + [p["code"] for p in plans])
        code = worst_code(codes)
        summary = {"created": now_iso(), "seconds": round(seconds, 2), "exit_code": code,
                   "engine": self.engine_name, "workers": self.workers, "converts": self.converts,
                   "targets": [dataclasses.asdict(o) for o in outcomes], "plans": plans}
        sj = self.out_dir / "summary.json"
        sm = self.out_dir / "summary.md"
        atomic_write_text(sj, json.dumps(jsonable(summary), indent=2))
        atomic_write_text(sm, render_summary(self.models, self.converts, outcomes, code, seconds,
                                                   self.engine_name, self.workers) + summary_section(outcomes)
                          + plan_section(plans))
        return RunResult(tuple(outcomes), self.converts, code, self.out_dir, sm, sj)
