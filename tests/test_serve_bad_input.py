"""Bad input to serve, repo check and loadtest: one line on stderr, its own exit code, no traceback,
nothing new at the output; and a loadtest that measured nothing fails."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures.onnx_tiny import linear
from fixtures.proc import run_retool
from retool.publish import publish


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-bad")
    model = linear(root / "lin.onnx")
    publish(model, root / "repo", "lin", max_regression="off")
    return root, model


@pytest.fixture
def repo(built, tmp_path):
    """A copy of the repository each test may damage."""
    shutil.copytree(built[0] / "repo", tmp_path / "repo")
    return tmp_path / "repo"


def _one_line(r, code: int, *needles: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("retool: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


FAST = [
    (("serve", "{repo}", "--http-port", "70000"), "--http-port 70000", "1 to 65535"),
    (("serve", "{repo}", "--http-port", "-1"), "--http-port -1", "1 to 65535"),
    (("serve", "{repo}", "--grpc-port", "0"), "--grpc-port 0", "1 to 65535"),
    (("serve", "{repo}", "--host", "10.255.255.1"), "--host 10.255.255.1", "not an address of this machine"),
    (("serve", "{repo}", "--host", "10.255.255.1", "--http-port", "8123"), "--host 10.255.255.1",
     "not an address of this machine"),
    (("serve", "{repo}", "--host", "no-such-host.invalid"), "--host no-such-host.invalid", "host name"),
    (("serve", "{repo}", "--timeout", "-1"), "--timeout -1", "above 0"),
    (("serve", "{repo}", "--timeout", "0"), "--timeout 0", "above 0"),
    (("serve", "{repo}", "--startup-timeout", "nan"), "--startup-timeout nan", "above 0"),
    (("serve", "{repo}", "--model", "../lin"), "'../lin'", "path separators"),
    (("repo", "check", "{repo}", "--timeout", "0"), "--timeout 0", "above 0"),
    (("repo", "check", "{repo}", "--url", "http://127.0.0.1:abc"), "--url http://127.0.0.1:abc", "not a valid URL"),
    (("repo", "check", "{repo}", "--url", "ftp://127.0.0.1:8000"), "--url ftp://127.0.0.1:8000", "http://"),
    (("loadtest", "{repo}", "lin", "--url", "http://127.0.0.1:abc"), "--url http://127.0.0.1:abc",
     "not a valid URL"),
    (("loadtest", "{repo}", "lin", "--timeout", "-1"), "--timeout -1", "above 0"),
]


@pytest.mark.parametrize("case", FAST, ids=[" ".join(c[0][:1] + c[0][2:]) for c in FAST])
def test_bad_flags_are_one_line_exit_2_and_start_nothing(repo, tmp_path, case):
    args, *needles = case
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_retool(*(a.format(repo=repo) for a in args), cwd=tmp_path)
    _one_line(r, 2, *needles)
    assert "in use" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no loadtest-lin/ or other output


PROFILES = [
    ([1, 2], "(a JSON object with kind"),
    ({"kind": "retool-serving-profile", "config": {"instance_count": "3"}}, "config.instance_count", "integer"),
    ({"kind": "retool-serving-profile", "config": {"max_queue_delay_microseconds": "abc"}},
     "config.max_queue_delay_microseconds", "integer"),
    ({"kind": "retool-serving-profile", "config": {}, "measurement": "abc"}, "measurement", "object"),
    ({"kind": "retool-serving-profile", "config": {"instance_count": 10**9}}, "config.instance_count", "1024"),
    ({"kind": "retool-serving-profile", "config": {"instance_cont": 2}}, "config.instance_cont", "unknown field"),
]


@pytest.mark.parametrize("case", PROFILES, ids=[str(i) for i in range(len(PROFILES))])
def test_a_bad_serving_profile_names_the_file_and_field_exit_2(built, tmp_path, case):
    content, *needles = case
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(content))
    r = run_retool("publish", built[1], "--repo", tmp_path / "repo", "--name", "lin", "--max-regression", "off",
                   "--serving-profile", prof, cwd=tmp_path)
    line = _one_line(r, 2, str(prof), *needles)
    assert "\n" not in line
    assert not (tmp_path / "repo" / "lin").exists()  # nothing published


def test_a_good_serving_profile_still_loads(tmp_path):
    from retool.serve.profile import ServingConfig, ServingProfile, load_profile

    p = ServingProfile("lin", ServingConfig(2, 1, True, 500, (4,)), {"throughput": 10.0}).save(tmp_path / "p.json")
    got = load_profile(p)
    assert got.config == ServingConfig(2, 1, True, 500, (4,)) and got.measurement == {"throughput": 10.0}


def _damage(repo: Path, what: str) -> None:
    v = repo / "lin" / "1"
    if what == "garbage samples":
        (v / "samples.npz").write_bytes(b"not a zip file at all")
    elif what == "deleted samples":
        (v / "samples.npz").unlink()
    elif what == "broken config":
        (repo / "lin" / "config.pbtxt").write_text('name: "lin"\nmax_batch_size: [oops\n')
    elif what == "garbage model":  # published normally, then the bytes replaced: Triton must refuse it
        (v / "model.onnx").write_bytes(bytes(range(256)) * 16)


@pytest.mark.slow
@pytest.mark.parametrize("cmd,what,code,needle", [
    ("check", "garbage samples", 7, "damaged samples file"),
    ("check", "deleted samples", 7, "samples file but it is missing"),
    ("check", "broken config", 7, "lin"),
    ("loadtest", "garbage samples", 7, "damaged samples file"),
    ("loadtest", "deleted samples", 7, "samples file but it is missing"),
    ("loadtest", "broken config", 7, "damaged config"),
    ("loadtest", "garbage model", 7, "Triton refused to load 'lin'"),
])
def test_a_damaged_version_is_one_line_and_exit_7(repo, tmp_path, cmd, what, code, needle):
    _damage(repo, what)
    args = ("repo", "check", repo) if cmd == "check" else ("loadtest", repo, "lin", "--window-ms", "500",
                                                            "--out", tmp_path / "lt")
    r = run_retool(*args, cwd=tmp_path)
    _one_line(r, code, needle)
    assert not (tmp_path / "lt").exists()  # no report of nothing


@pytest.mark.slow
def test_loadtest_whose_perf_analyzer_fails_exits_8_with_its_reason(repo, tmp_path):
    # 100000 client threads: perf_analyzer aborts (std::system_error) in about 10 s here
    r = run_retool("loadtest", repo, "lin", "--concurrency", "100000", "--window-ms", "500",
                   "--out", tmp_path / "lt", cwd=tmp_path, timeout=300)
    _one_line(r, 8, "nothing measured", "perf_analyzer on lin failed")
    assert not (tmp_path / "lt").exists()

