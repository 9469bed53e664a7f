"""CPU feature detection on faked /proc/cpuinfo files, and the profile choices that follow from it."""
from __future__ import annotations

import json

import pytest

INTEL_VNNI = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
flags\t\t: fpu
"""
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni vaes
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm bf16
CPU implementer\t: 0x41
CPU architecture: 8
"""


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text, name="cpuinfo"):
        p = tmp_path / name
        p.write_text(text)
        return p
    return write


def test_intel_vnni_amx(cpuinfo):
    from retool.optimizers.hardware import detect

    cpu = detect(cpuinfo(INTEL_VNNI))
    assert cpu.arch == "x86_64" and cpu.model.startswith("Intel")
    assert cpu.vnni and cpu.avx512 and cpu.amx and cpu.kind == "x86-amx"
    d = cpu.to_dict()
    assert d["flags"]["avx512_vnni"] and d["flags"]["amx_int8"] and not d["dotprod"]


def test_amd_avx2_without_vnni(cpuinfo):
    from retool.optimizers.hardware import detect

    cpu = detect(cpuinfo(AMD_AVX2))
    assert cpu.arch == "x86_64" and cpu.has("avx2")
    assert not cpu.vnni and not cpu.avx512 and not cpu.amx
    assert cpu.kind == "x86-avx2"


def test_arm_dotprod_i8mm(cpuinfo):
    from retool.optimizers.hardware import detect

    cpu = detect(cpuinfo(ARM))
    assert cpu.arch == "arm64" and cpu.dotprod and cpu.has("i8mm") and cpu.kind == "arm64-i8mm"
    assert not cpu.vnni
    assert cpu.to_dict()["i8mm"] is True


def test_avx_vnni_without_avx512_counts_as_vnni(cpuinfo):
    from retool.optimizers.hardware import detect

    cpu = detect(cpuinfo(AMD_AVX2.replace("avx2", "avx2 avx_vnni")))
    assert cpu.vnni and not cpu.avx512 and cpu.kind == "x86-vnni"


def test_reduce_range_only_without_vnni(cpuinfo):
    from retool.optimizers.hardware import adapt, detect
    from retool.optimizers.targets import get_target

    p = get_target("cpu-int8")
    on_amd, notes = adapt(p, detect(cpuinfo(AMD_AVX2, "amd")))
    on_intel, notes_i = adapt(p, detect(cpuinfo(INTEL_VNNI, "intel")))
    assert on_amd.reduce_range is True and "lacks VNNI" in notes[0]
    assert on_intel.reduce_range is False and "has VNNI" in notes_i[0]
    assert (on_amd.activation_type, on_amd.weight_type) == ("uint8", "int8")  # U8S8 on x86 (ORT guidance)
    arm, _ = adapt(get_target("arm64-int8"), detect(cpuinfo(ARM, "arm")))
    assert (arm.activation_type, arm.weight_type, arm.reduce_range) == ("int8", "int8", False)  # S8S8 on ARM


def test_report_records_hardware_and_cross_cpu_mismatch(cnn_onnx, tmp_path, cpuinfo, monkeypatch):
    """A VNNI-tuned artifact measured on an AVX2-only CPU, and an ARM target built on x86, say so."""
    import onnx

    from retool.optimizers.core import optimize

    monkeypatch.setenv("RETOOL_CPUINFO", str(cpuinfo(AMD_AVX2, "here")))
    _, rep = optimize(cnn_onnx, tmp_path / "vnni.onnx", target="cpu-int8", measure=False, tune_for="x86-vnni")
    hw = rep.data["hardware"]
    assert hw["here"]["kind"] == "x86-avx2" and hw["tuned_for"]["kind"] == "x86-vnni"
    assert rep.data["profile"]["reduce_range"] is False
    assert any("tuned for x86-vnni" in w for w in rep.warnings), rep.warnings
    # without reduce_range the weights use the full int8 range (7-bit weights never pass 63)
    m = onnx.load(str(tmp_path / "vnni.onnx"))
    from onnx import numpy_helper

    q = [numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8
         and len(t.dims) == 4]
    assert q and max(int(abs(a.astype(int)).max()) for a in q) > 64

    _, rep2 = optimize(cnn_onnx, tmp_path / "here.onnx", target="cpu-int8", measure=False)
    # no VNNI here: the guidance says reduce_range, and both are measured; the report says which won
    choices = rep2.data["hardware"]["choices"]
    assert "lacks VNNI" in choices[0] and choices[1].startswith("measured on calibration samples")
    kept_on = choices[1].endswith("reduce_range=on")
    assert rep2.data["profile"]["reduce_range"] is kept_on and not rep2.data["hardware"]["mismatch"]
    assert json.loads(rep2.to_json())["data"]["hardware"]["here"]["vnni"] is False

    _, rep3 = optimize(cnn_onnx, tmp_path / "arm.onnx", target="arm64-int8", measure=False)
    assert any("meant for arm64" in w for w in rep3.warnings), rep3.warnings
    import jsonschema

    from retool.validators.core import report_schema

    jsonschema.validate(json.loads(rep.to_json()), report_schema())
    bad = json.loads(rep.to_json())
    bad["data"]["hardware"]["here"]["vnni"] = "no"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, report_schema())
