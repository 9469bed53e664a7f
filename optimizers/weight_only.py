"""Weight-only int4 / int8 with onnxruntime's MatMulNBits (``MatMulNBitsQuantizer``).

Settings measured for decoders on CPU: block 32, symmetric, ``accuracy_level=4`` (int8
compute; without it decoding is ~30 % slower). The quantizer only touches ``MatMul`` nodes
whose weight is a stored constant, and skips everything else *silently*: the dynamo exporter
writes GPT-2's Conv1D layers as ``Gemm`` and may feed a tied head through a ``Transpose``.
So the graph is first rewritten (Gemm -> MatMul + Add with the weight stored transposed as a
constant; Transpose of a constant folded), and afterwards the result must hold one MatMulNBits
per weight MatMul and be smaller, or this fails loudly.

Algorithms: ``rtn`` (round to nearest, ORT's default quantizer), ``hqq`` (ORT's HQQ: no data,
asymmetric; its nodes get ``accuracy_level`` set afterwards, ORT writes none) and ``gptq``
(calibrated; retool's own, see optimizers/gptq.py for why not ORT's).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from retool.errors import OptimizationError, first_line


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def expose_weights(model) -> dict:
    """Rewrite ``model`` in place so that every weight product is MatMul(x, constant 2-D W)."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    new_nodes, gemms, transposes = [], 0, 0
    producers = {o: n for n in g.node for o in n.output}
    dropped = set()

    def const(name, array):
        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        g.initializer.append(t)
        inits[name] = t
        return name

    for n in g.node:
        if n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] in inits:
            a = _attrs(n)
            if a.get("transA", 0):
                new_nodes.append(n)
                continue
            w = numpy_helper.to_array(inits[n.input[1]])
            if a.get("transB", 0):
                w = w.T
            alpha = float(a.get("alpha", 1.0))
            w = (w * alpha).astype(w.dtype) if alpha != 1.0 else w
            wname = const(f"{n.input[1]}__matmul_w_{gemms}", w)
            out = n.output[0]
            has_c = len(n.input) > 2 and n.input[2]
            mm_out = f"{out}__matmul" if has_c else out
            new_nodes.append(onnx.helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=f"{n.name}_MatMul"))
            if has_c:
                beta = float(a.get("beta", 1.0))
                c = n.input[2]
                if beta != 1.0:
                    if c not in inits:
                        raise OptimizationError(f"{n.name}: Gemm with beta={beta} and a computed bias is not supported")
                    c = const(f"{c}__beta_{gemms}", numpy_helper.to_array(inits[c]) * beta)
                new_nodes.append(onnx.helper.make_node("Add", [mm_out, c], [out], name=f"{n.name}_Add"))
            gemms += 1
            continue
        if n.op_type == "MatMul" and n.input[1] not in inits and n.input[1] in producers:
            p = producers[n.input[1]]
            perm = _attrs(p).get("perm")
            if p.op_type == "Transpose" and p.input[0] in inits and (perm is None or list(perm) == [1, 0]):
                w = numpy_helper.to_array(inits[p.input[0]])
                if w.ndim == 2:
                    wname = const(f"{p.input[0]}__transposed_{transposes}", w.T)
                    n.input[1] = wname
                    transposes += 1
                    if consumers.get(p.output[0], 0) == 1:
                        dropped.add(id(p))
        new_nodes.append(n)
    kept = [n for n in new_nodes if id(n) not in dropped]
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return {"gemm_rewritten": gemms, "transposed_weights_folded": transposes}


def weight_matmuls(model) -> list[str]:
    """MatMul nodes whose second input is a stored 2-D constant: what MatMulNBits should replace."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def weight_bytes(model) -> int:
    """Bytes of the stored tensors: on a tiny model the graph itself outweighs them in the file."""
    from onnx import numpy_helper

    return sum(len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def count_op(model, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def check_quantized(where, expected: int, got: int, size_in: int, size_out: int) -> None:
    """Fail loudly when the quantizer skipped weights (it does so silently) or the file did not shrink."""
    if expected == 0:
        raise OptimizationError(f"{where}: no MatMul with a constant weight to quantize; weight-only "
                                f"quantization does not apply to this model (choose another --target)")
    if got < expected:
        raise OptimizationError(f"{where}: only {got} of {expected} weight MatMuls became MatMulNBits; the "
                                f"quantizer skipped the rest, so the model would keep their full size")
    if size_out >= size_in:
        raise OptimizationError(f"{where}: the weight-only model is not smaller ({size_out} bytes vs "
                                f"{size_in}); the quantization did not take effect")


#: weight-only algorithms: onnxruntime's round-to-nearest, GPTQ (calibrated) and HQQ (no data)
ALGORITHMS = ("rtn", "gptq", "hqq")


def _algo_config(algorithm: str, bits: int, block_size: int, symmetric: bool, accuracy_level, calibration):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig

    if algorithm == "hqq":  # always asymmetric (it optimises the zero point)
        return HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    if algorithm == "gptq":  # retool's GPTQ (optimizers/gptq.py) rewrites a symmetric RTN result's ints and scales
        if bits != 4:
            raise OptimizationError(f"algorithm gptq writes int4 only, not int{bits}; use rtn or hqq")
        if not calibration:
            raise OptimizationError("algorithm gptq needs calibration feeds")
        symmetric = True
    return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                        accuracy_level=accuracy_level, bits=bits)


def set_accuracy_level(model, level: int | None) -> int:
    """Set ``accuracy_level`` on every MatMulNBits (HQQ writes none, i.e. fp32 compute); returns how many."""
    import onnx

    if level is None:
        return 0
    n = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(keep + [onnx.helper.make_attribute("accuracy_level", int(level))])
            n += 1
    return n


def quantize(src, dst, bits: int = 4, block_size: int = 32, accuracy_level: int | None = 4,
             symmetric: bool = True, algorithm: str = "rtn", calibration=None) -> dict:
    """Write the MatMulNBits model of ``src`` to ``dst``; returns what was done (counts, sizes).

    ``algorithm``: rtn | gptq | hqq; ``calibration``: feed dicts of ``src`` (gptq only)."""
    import copy
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from retool.fsutil import file_size

    if algorithm not in ALGORITHMS:
        raise OptimizationError(f"weight-only algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    rewrites = expose_weights(model)
    expected = len(weight_matmuls(model))
    w_in = max(1, weight_bytes(model))
    cfg = _algo_config(algorithm, bits, block_size, symmetric, accuracy_level, calibration)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    symmetric = symmetric or algorithm == "gptq"
    fp_model = copy.deepcopy(model) if algorithm == "gptq" else None
    gptq_weights = 0
    try:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, algo_config=cfg)
        q.process()
        out = q.model.model
        if fp_model is not None:
            from retool.optimizers import gptq

            gptq_weights = gptq.apply(out, fp_model, calibration, block_size)
            if not gptq_weights:
                raise OptimizationError("GPTQ found no symmetric MatMulNBits weight to rewrite")
    except Exception as exc:
        raise OptimizationError(f"{src}: MatMulNBits quantization ({algorithm}) failed "
                                f"({first_line(exc, 200)})") from exc
    set_accuracy_level(out, accuracy_level)
    got = count_op(out, "MatMulNBits")
    large = out.ByteSize() > 1_900_000_000
    onnx.save(out, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
              location=dst.name + ".data" if large else None)
    from retool.fsutil import external_data_files

    size_in, size_out = file_size(src, external_data_files(src)), file_size(dst, external_data_files(dst))
    check_quantized(src, expected, got, size_in, size_out)
    return {**rewrites, "weight_matmuls": expected, "weight_bytes_ratio": round(weight_bytes(out) / w_in, 4), "matmulnbits": got, "bits": bits, "block_size": block_size,
            "accuracy_level": accuracy_level, "symmetric": symmetric if algorithm != "hqq" else False,
            "algorithm": algorithm, "calibration_feeds": len(calibration or []) if algorithm == "gptq" else 0,
            "gptq_weights": gptq_weights,
            "size_in": size_in, "size_out": size_out}
