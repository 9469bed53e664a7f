"""retool convert."""
from __future__ import annotations

import click

from retool.commands.common import (COSINE, NEW_TOKENS, OPSET, SEED, TOLERANCE, converter_options, emit_report,
                                    source_options)


@click.command("convert")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the ONNX model.")
@click.option("--opset", type=OPSET, help="ONNX opset (tf2onnx: 13-18; torch dynamo exporter: 18+).")
@click.option("--no-verify", is_flag=True, help="Skip the parity check against the source framework.")
@click.option("--atol", type=TOLERANCE, help="Absolute tolerance for parity (default by precision).")
@click.option("--rtol", type=TOLERANCE, help="Relative tolerance for parity.")
@click.option("--min-cosine", type=COSINE, help="Minimum cosine similarity per output.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random verification inputs.")
@source_options
@click.option("--task", help="Hugging Face folder: feature-extraction, sequence-classification, "
                             "image-classification, text-generation or text2text-generation (default: from "
                             "config.json's architectures).")
@click.option("--new-tokens", type=NEW_TOKENS, help="text-generation / text2text-generation: greedy tokens compared in "
                                                     "the parity check (default 32 / 16).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def convert_cmd(source, output, framework, weights, inputs, example_inputs, opset, trust_remote_code, no_verify,
                atol, rtol, min_cosine, seed, signature, output_names, inputs_as_nchw, custom_objects,
                static_batch, fold_batchnorm, as_json, task=None, new_tokens=None):
    """Convert SOURCE to ONNX and prove that its outputs match the source framework.

    SOURCE is a model file or folder (TorchScript, .pt2, pickled nn.Module, SavedModel,
    .pb, .keras, .h5, Caffe .prototxt), a Hugging Face save_pretrained folder, or a
    ``package.module:factory`` callable.

    On a parity failure nothing is written at -o; the sidecar report says why (exit 6).
    """
    from retool import console
    from retool.converter.core import convert
    from retool.errors import ValidationFailed
    # only what was given: the defaults depend on the source's precision (int8 for a quantized source)
    tol = {k: v for k, v in {"atol": atol, "rtol": rtol, "min_cosine": min_cosine}.items() if v is not None}
    options = converter_options(signature, output_names, inputs_as_nchw, custom_objects, static_batch,
                                fold_batchnorm)
    options.update({k: v for k, v in {"task": task, "new_tokens": new_tokens}.items() if v is not None})
    try:
        art, report = convert(source, output, framework=framework, weights=weights, inputs=inputs,
                              example_inputs=example_inputs, opset=opset, trust_remote_code=trust_remote_code,
                              verify=not no_verify, tolerance=tol, options=options, seed=seed)
    except ValidationFailed as exc:
        if exc.report is not None:
            emit_report(exc.report, as_json, console.checks_table(exc.report.checks))
        raise
    human = console.checks_table(report.checks) + f"\n\nwrote {art.path} (opset {art.opset}, {report.data.get('exporter')})"
    if report.data.get("task") == "text2text-generation":  # the decoder; the encoder and the loop lie beside it
        human += f"\n  and beside it {', '.join(art.extra_files)} (encoder, loop: docs/huggingface.md)"
    emit_report(report, as_json, human)
