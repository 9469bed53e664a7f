"""The three reports: report.json against its schema, report.md, report.html rendered in headless Chromium."""
from __future__ import annotations

import json
import re

import pytest

from fixtures import onnx_models
from fixtures.browser import chromium, needs_chromium
from retool.types import Report
from retool.validators.core import report_schema, validate, write_reports


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A failing report with every section filled: latency for two variants, three batch sizes, a failed gate."""
    d = tmp_path_factory.mktemp("validate_reports")
    ref = onnx_models.linear(d / "ref.onnx")
    leak = onnx_models.linear(d / "leak.onnx", batch_leak=True)
    report = validate(leak, ref, batch_sizes=(1, 4, 16), latency=True, runs=15, threads=1,
                      gates={"max_size_mb": 10, "min_speedup": 1e-6}, report_dir=d / "out")
    return report, d / "out"


def _validator():
    import jsonschema

    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_report_json_is_valid_against_its_schema(reports):
    report, out = reports
    data = json.loads((out / "report.json").read_text())
    errors = sorted(_validator().iter_errors(data), key=str)
    assert not errors, [e.message for e in errors[:5]]
    assert data["stage"] == "validate" and data["schema_version"] == report.schema_version
    assert Report.load(out / "report.json").to_dict()["data"]["gates"] == data["data"]["gates"]


def test_schema_rejects_a_report_missing_required_validate_keys(reports):
    _, out = reports
    data = json.loads((out / "report.json").read_text())
    v = _validator()
    for key in ("latency", "gates", "parity", "size_mb"):
        broken = json.loads(json.dumps(data))
        del broken["data"][key]
        assert any(key in e.message for e in v.iter_errors(broken)), key
    broken = json.loads(json.dumps(data))
    broken["data"]["latency"]["candidate"]["1"].pop("p99_ms")
    assert list(v.iter_errors(broken))


def test_report_of_another_stage_only_needs_the_envelope():
    r = Report("convert", data={"anything": 1})
    assert not list(_validator().iter_errors(json.loads(r.to_json())))


def test_report_md_fits_a_job_summary(reports):
    report, out = reports
    md = (out / "report.md").read_text()
    assert md.startswith("## retool validate: ❌ FAIL")
    assert "| check | batch | candidate | reference | threshold | result |" in md
    assert "`parity:y@batch4`" in md  # failed gates named up front
    assert len(md.encode()) < 64_000  # GitHub caps a step summary at 1 MiB; keep it short


def test_report_html_is_self_contained(reports):
    _, out = reports
    html = (out / "report.html").read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "no network references"
    assert html.count('class="plot latency"') == 3  # one distribution per batch size
    assert html.count('class="plot throughput"') == 1
    assert html.count('class="plot errhist"') == 1  # one histogram per output
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "inlined figures never share an element id"


def test_fail_header_names_the_failed_gates(reports):
    report, out = reports
    html = (out / "report.html").read_text()
    header = html[html.index("<h1>"):html.index("<h2>")]
    assert report.failed_checks and "Failed gates:" in header
    assert all(f"<code>{c.name}</code>" in header for c in report.failed_checks)
    passed = [c.name for c in report.checks if c.severity == "gate" and c.passed]
    assert passed and not any(f"<code>{n}</code>" in header for n in passed)


def test_plots_are_matplotlib_svg_and_deterministic(reports):
    from retool.validators.report_html import latency_svg, throughput_svg

    report, _ = reports
    lat = report.data["latency"]
    stats = {n: lat[n]["1"] for n in ("candidate", "reference")}
    one = latency_svg("1", stats)
    assert one == latency_svg("1", stats) and throughput_svg(lat) == throughput_svg(lat)
    assert one.startswith('<svg class="plot latency"') and "Matplotlib" in one
    assert "<dc:date>" not in one  # no timestamp: reruns give the same bytes
    # the axes say what they measure, with numeric ticks
    assert ">ms per batch<" in one and ">batch size<" in throughput_svg(lat)
    assert all(f">{b}<" in throughput_svg(lat) for b in (1, 4, 16))


def test_write_reports_returns_the_three_paths(reports, tmp_path):
    report, _ = reports
    paths = write_reports(report, tmp_path / "again")
    assert sorted(paths) == ["html", "json", "md"]
    assert all(p.is_file() and p.parent == tmp_path / "again" for p in paths.values())


@needs_chromium
def test_report_html_renders_in_headless_chromium(reports, tmp_path):
    _, out = reports
    url = (out / "report.html").resolve().as_uri()
    dom = chromium("--dump-dom", url, tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the parsed DOM (not just our text) holds the plots, with their marks
    assert dom.stdout.count("<svg") >= 5
    # every latency sample kept inside the axis is one mark in its variant's group
    from retool.validators.report_html import latency_axis_max

    lat = json.loads((out / "report.json").read_text())["data"]["latency"]
    for b in lat["candidate"]:
        hi = latency_axis_max({n: lat[n][b] for n in ("candidate", "reference")})
        for n in ("candidate", "reference"):
            group = re.search(rf'<g id="runs-{b}-{n}">(.*?)</g>', dom.stdout, re.S)
            shown = sum(1 for v in lat[n][b]["samples_ms"] if v <= hi)
            assert group and group.group(1).count("<use") == shown > 15, (b, n)
    assert "<rect" in dom.stdout and "FAIL" in dom.stdout

    png = tmp_path / "report.png"
    shot = chromium(f"--screenshot={png}", "--window-size=1100,1600", url, tmp_path=tmp_path)
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    import cv2
    import numpy as np

    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] >= 1000 and img.shape[1] >= 1000
    # not blank: plenty of non-background pixels, including the plots' blue and orange
    non_bg = np.any(np.abs(img.astype(int) - img[5, 5].astype(int)) > 30, axis=2).mean()
    assert non_bg > 0.02
    b, g, r = img[..., 0].astype(int), img[..., 1].astype(int), img[..., 2].astype(int)
    assert ((b > 180) & (r < 100)).sum() > 50, "candidate series (blue) drawn"
    assert ((r > 200) & (b < 80) & (g > 80)).sum() > 50, "reference series (orange) drawn"


def test_sparse_reports_are_valid_and_render(tmp_path):
    """No reference, no latency, or a candidate that does not even load: still valid, still a page."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="retool.test")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("retool.test", 1)]),
              str(tmp_path / "broken.onnx"))
    good = onnx_models.linear(tmp_path / "good.onnx")
    v = _validator()
    for i, (cand, passed) in enumerate(((tmp_path / "broken.onnx", False), (good, True))):
        r = validate(cand, report_dir=tmp_path / f"r{i}")
        assert r.passed is passed
        data = json.loads((tmp_path / f"r{i}" / "report.json").read_text())
        assert not list(v.iter_errors(data))
        html = (tmp_path / f"r{i}" / "report.html").read_text()
        assert ("FAIL" if not passed else "PASS") in html and "</html>" in html
