"""Helpers shared by the subcommands."""
from __future__ import annotations

import math

import click

from retool.types import Report


def emit_report(report: Report, as_json: bool, human: str) -> None:
    """JSON report on stdout with --json, else the human table."""
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(human)


# --- numbers: one type for flags and pipeline YAML --------------------------------------------
def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class Number(click.ParamType):
    """A finite int or float within [min, max] (either end open with min_open / max_open).

    As a click type it rejects a bad flag with one line naming the flag and the allowed range
    (a retool UsageError, exit 2, not click's multi-line usage block). ``check`` does the same for
    a value read from a file: ``what`` is then e.g. ``"pipe.yaml:12: models[0].opset"``.
    """

    def __init__(self, kind: type = float, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False):
        if kind not in (int, float):
            raise TypeError("Number kind is int or float")
        self.kind, self.min, self.max, self.min_open, self.max_open = kind, min, max, min_open, max_open
        self.name = "integer" if kind is int else "number"

    def describe(self) -> str:
        """'an integer from 1 to 65536', 'a number > 0', ..."""
        noun = "an integer" if self.kind is int else "a number"
        lo, hi = self.min, self.max
        if lo is not None and hi is not None and not (self.min_open or self.max_open):
            return f"{noun} from {_fmt(lo)} to {_fmt(hi)}"
        parts = []
        if lo is not None:
            parts.append(f"{'>' if self.min_open else '>='} {_fmt(lo)}")
        if hi is not None:
            parts.append(f"{'<' if self.max_open else '<='} {_fmt(hi)}")
        return f"{noun} {' and '.join(parts)}" if parts else f"a finite {self.name}"

    def check(self, value, what: str):
        """``value`` (a number, or text from a flag) as ``kind``; else UsageError '<what>: ... expected ...'."""
        from retool.errors import UsageError

        shown = repr(value) if isinstance(value, str) and value.strip() != value else str(value)
        if len(shown) > 40:  # a 400-digit number says nothing more than its start
            shown = f"{shown[:24]}… ({len(shown)} characters)"
        want = f"expected {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UsageError(f"{what}: {shown} is not a number; {want}")
        x = value
        if isinstance(value, str):
            try:
                x = int(value.strip(), 10) if self.kind is int else float(value)
            except ValueError:
                raise UsageError(f"{what}: {shown} is not {'an integer' if self.kind is int else 'a number'}; "
                                 f"{want}") from None
        if self.kind is int:
            if isinstance(x, float):
                if not (math.isfinite(x) and x.is_integer()):
                    raise UsageError(f"{what}: {shown} is not an integer; {want}")
                x = int(x)
        else:
            if isinstance(x, int) and abs(x) > 2**1023:  # float() of it would overflow
                raise UsageError(f"{what}: {shown} is out of range; {want}")
            if not math.isfinite(float(x)):
                raise UsageError(f"{what}: {shown} is not a finite number; {want}")
        if self.min is not None and (x < self.min or (self.min_open and x == self.min)):
            raise UsageError(f"{what}: {shown} is out of range; {want}")
        if self.max is not None and (x > self.max or (self.max_open and x == self.max)):
            raise UsageError(f"{what}: {shown} is out of range; {want}")
        return x  # an int given for a float stays an int (cache keys and reports show 5, not 5.0)

    def convert(self, value, param, ctx):
        if value is None:
            return None
        flag = max(param.opts, key=len) if param is not None and param.opts else "value"
        return self.check(value, flag)

    def __repr__(self) -> str:
        return f"Number({self.describe()})"


def check_number(value, what: str, kind: type = float, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False):
    """The plain-function form of ``Number(...).check(value, what)``, for files and APIs."""
    return Number(kind, min, max, min_open, max_open).check(value, what)


#: shared ranges, so a flag and its pipeline YAML key accept the same values
SEED = Number(int, 0, 2**32 - 1)  # numpy's legacy seeding takes at most 32 bits
#: far above any real batch; larger ones only allocate until MemoryError
BATCH_SIZE = Number(int, 1, 65536)
THREADS = Number(int, 1, 1024)
WORKERS = Number(int, 1, 256)
RUNS = Number(int, 1, 10_000_000)
#: seconds of timing per batch size (0: exactly --runs)
TIME_BUDGET_S = Number(float, 0, 86400)
MILLISECONDS = Number(float, 0, None, min_open=True)
SPEEDUP = Number(float, 0, None, min_open=True)
SIZE_MB = Number(float, 0, None, min_open=True)
TOLERANCE = Number(float, 0)
COSINE = Number(float, -1, 1)
FRACTION = Number(float, 0, 1)
PERCENTILE = Number(float, 0, 100, min_open=True)
SAMPLES = Number(int, 1, 10_000_000)
OPSET = Number(int, 7, 25)  # converter/core.py says which exporter takes which
NEW_TOKENS = Number(int, 1, 65536)
#: serving: requests per second, money per hour, perf_analyzer's concurrency and window
RATE = Number(float, 0, None, min_open=True)
COST_PER_HOUR = Number(float, 0)
CONCURRENCY = Number(int, 1, 4096)
WINDOW_MS = Number(int, 1, 3_600_000)
#: the serving plan: one replica's share of its sustainable rate, and its cores
HEADROOM = Number(float, 0, 1, min_open=True)
CORES = Number(int, 1, 4096)
PORT = Number(int, 1, 65535)


def raise_if_output_disk_full(output, exc: BaseException, need_bytes: int = 0) -> None:
    """UsageError naming ``output`` when a step failed and the disk holding it is (nearly) full.

    Libraries such as onnxruntime report a full disk as 'Protobuf serialization failed', without errno."""
    import shutil
    from pathlib import Path

    from retool.errors import UsageError, first_line

    folder = Path(output).expanduser().absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need_bytes + (1 << 20):
        raise UsageError(f"{output}: could not be written: {free / 1e6:.1f} MB free on its disk ({first_line(exc, 200)}); "
                         f"free space or choose another -o") from None


def parse_csv_numbers(text: str | None, flag: str, number: Number) -> list | None:
    """'1,8,32' -> [1, 8, 32], each checked by ``number``; None for an empty flag."""
    from retool.errors import UsageError

    if text is None or not str(text).strip():
        return None
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    if not parts:
        raise UsageError(f"{flag} {text!r}: expected comma-separated values such as 1,8,32, each "
                         f"{number.describe()}")
    return [number.check(p, flag) for p in parts]


def parse_csv_ints(text: str | None, flag: str, number: Number | None = None) -> list[int] | None:
    """Comma-separated positive integers (or as ``number`` says)."""
    return parse_csv_numbers(text, flag, number or Number(int, 1, 2**31 - 1))


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
