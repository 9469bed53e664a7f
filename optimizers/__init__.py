"""Optimise an ONNX model for a target: graph passes, int8 quantization, fp16.

Entry point: :func:`retool.optimizers.core.optimize`. Target profiles live in
:mod:`retool.optimizers.targets` and are registered in ``retool.registry.TARGETS``.
"""
