"""Helpers shared by the subcommands."""
from __future__ import annotations


import click

from retool.types import Report


def emit_report(report: Report, as_json: bool, human: str) -> None:
    """JSON report on stdout with --json, else the human table."""
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(human)


def parse_csv_ints(text: str | None, flag: str) -> list[int] | None:
    from retool.errors import UsageError

    if not text:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers such as 1,8,32") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} {text!r}: expected positive integers")
    return vals


def source_options(f):
    """The flags that say how to load a source model (convert's SOURCE, validate's --reference)."""
    opts = [
        click.option("--framework", default="auto", show_default=True,
                     help="auto, torch, tensorflow, caffe or onnx."),
        click.option("--weights", type=click.Path(),
                     help="state_dict for a torch factory, or the .caffemodel for a Caffe prototxt."),
        click.option("--input", "inputs", multiple=True, metavar="NAME:DTYPE:SHAPE",
                     help="Input signature, e.g. x:float32:batch,3,224,224 (a named dim is dynamic). Repeatable."),
        click.option("--example-inputs", type=click.Path(),
                     help=".npz with one array per input, used instead of seeded random data."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow loading files that execute code (pickled modules, Keras Lambda/custom objects)."),
        click.option("--signature", help="TF SavedModel signature (default serving_default)."),
        click.option("--output-names", help="Comma-separated output names: TF/Keras/GraphDef pick and order "
                     "outputs; torch names its outputs in order."),
        click.option("--inputs-as-nchw", is_flag=True, help="Serve an NHWC TF/Keras vision model as NCHW."),
        click.option("--custom-objects", multiple=True, metavar="MODULE:ATTR",
                     help="Keras custom objects to load (needs --trust-remote-code). Repeatable."),
        click.option("--static-batch", is_flag=True, help="Caffe: keep the batch size the deploy file declares."),
        click.option("--fold-batchnorm", is_flag=True,
                     help="Caffe: fold BatchNorm/Scale into the preceding convolution."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def converter_options(signature=None, output_names=None, inputs_as_nchw=False, custom_objects=(),
                      static_batch=False, fold_batchnorm=False) -> dict:
    """The framework-specific flags of ``source_options`` as a converter's ``options`` mapping."""
    return {k: v for k, v in {
        "signature": signature,
        "output_names": [s.strip() for s in output_names.split(",")] if output_names else None,
        "inputs_as_nchw": inputs_as_nchw or None,
        "custom_objects": list(custom_objects) or None,
        "static_batch": static_batch or None,
        "fold_batchnorm": fold_batchnorm or None,
    }.items() if v is not None}
