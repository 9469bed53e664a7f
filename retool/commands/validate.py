"""retool validate."""
from __future__ import annotations

import click

from retool.commands.common import (BATCH_SIZE, COSINE, MILLISECONDS, RUNS, SEED, SIZE_MB, SPEEDUP, THREADS,
                                    TIME_BUDGET_S, TOLERANCE, converter_options, emit_report, parse_csv_ints,
                                    source_options)


@click.command("validate")
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--reference", "reference", metavar="REF",
              help="Another ONNX file, or the source model in any form 'retool convert' accepts.")
@click.option("--latency", is_flag=True, help="Measure latency (also on when a latency or speedup gate is set).")
@click.option("--batch-sizes", default="1", show_default=True, metavar="1,8,32",
              help="Batch sizes for parity and latency (parity also runs at 4 when only 1 is given and the batch is dynamic).")
@click.option("--threads", type=THREADS, help="Intra-op threads for every variant (default: the CPUs this process may use).")
@click.option("--runs", type=RUNS, help="At least this many timed runs per batch size (with at least 1 s of "
              "timing too, unless --time-budget says otherwise; --time-budget 0: exactly --runs).")
@click.option("--time-budget", "time_budget_s", type=TIME_BUDGET_S,
              help="At least this many seconds of timing per batch size, all variants together (default 2).")
@click.option("--gates", "gates_file", type=click.Path(dir_okay=False), help="YAML file of budgets (see docs/validate.md).")
@click.option("--max-p99-ms", type=MILLISECONDS, help="Gate: p99 latency budget in ms at every measured batch size.")
@click.option("--min-speedup", type=SPEEDUP, help="Gate: minimum reference p50 / candidate p50.")
@click.option("--max-size-mb", type=SIZE_MB, help="Gate: maximum model size in MB (10^6 bytes, with external data).")
@click.option("--allow-slower", is_flag=True, help="Switch off the default gate that fails a quantized candidate "
              "slower than the reference beyond the noise (the report says it was switched off).")
@click.option("--undecided", type=click.Choice(["pass", "fail"]), help="A latency gate whose confidence interval "
              "still straddles its threshold counts as this (default: fail for --min-speedup/--max-p99-ms, pass for "
              "not-slower; docs/validate.md).")
@click.option("--decide-budget", "decide_budget_s", type=TIME_BUDGET_S, metavar="SECONDS", help="Extra timing per batch "
              "size while a latency gate is undecided (default 5; 0: none).")
@click.option("--atol", type=TOLERANCE, help="Parity: absolute tolerance for every output.")
@click.option("--rtol", type=TOLERANCE, help="Parity: relative tolerance for every output.")
@click.option("--min-cosine", type=COSINE, help="Parity: minimum cosine similarity for every output.")
@click.option("--report-dir", type=click.Path(file_okay=False), help="Write report.json, report.md and report.html here.")
@source_options
@click.option("--provider", "providers", multiple=True, metavar="NAME",
              help="onnxruntime execution provider for the candidate and an ONNX reference, in order "
                   "(default CPUExecutionProvider). Repeatable.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def validate_cmd(candidate, reference, latency, batch_sizes, threads, runs, time_budget_s, gates_file, max_p99_ms,
                 min_speedup, max_size_mb, allow_slower, undecided, decide_budget_s, atol, rtol, min_cosine, report_dir, framework, weights, inputs,
                 example_inputs, trust_remote_code, signature, output_names, inputs_as_nchw, custom_objects,
                 static_batch, fold_batchnorm, providers, seed, as_json):
    """Is CANDIDATE (an ONNX model) ready for production?

    Checks parity against --reference at every batch size (and that rows of a
    batch do not affect each other), measures latency interleaved with the
    reference, reports node placement, and applies the gates. Prints one table;
    exits 6 when a gate fails.
    """
    from retool import console
    from retool.errors import UsageError, ValidationFailed
    from retool.validators.core import GATE_HEADERS, gate_rows, summary_text, validate
    from retool.validators.failure import failure_line
    from retool.validators.gates import load_gates

    sizes = parse_csv_ints(batch_sizes, "--batch-sizes", BATCH_SIZE) or [1]
    gates = load_gates(gates_file)
    tol_flags = {k: v for k, v in {"atol": atol, "rtol": rtol, "min_cosine": min_cosine}.items() if v is not None}
    parity = dict(gates.parity)
    if tol_flags:
        parity["*"] = {**parity.get("*", {}), **tol_flags}
    gates = gates.merged(max_p99_ms=max_p99_ms, min_speedup=min_speedup, max_size_mb=max_size_mb, parity=parity,
                         not_slower=False if allow_slower else None, undecided=undecided,
                         decide_budget_s=decide_budget_s)
    options = converter_options(signature, output_names, inputs_as_nchw, custom_objects, static_batch,
                                fold_batchnorm)
    try:
        report = validate(candidate, reference, batch_sizes=sizes, latency=latency, threads=threads, gates=gates,
                          report_dir=report_dir, framework=framework, inputs=inputs, example_inputs=example_inputs,
                          trust_remote_code=trust_remote_code, seed=seed, runs=runs, time_budget_s=time_budget_s,
                          weights=weights, options=options, providers=list(providers) or None)
    except MemoryError:  # inputs (or outputs) of the largest batch do not fit in this machine
        raise UsageError(f"--batch-sizes {batch_sizes}: ran out of memory at batch {max(sizes)}; "
                         f"use smaller batch sizes") from None
    human = summary_text(report)
    if report_dir:
        human += f"\nreports: {report_dir}/report.json, report.md, report.html"
    for w in report.warnings:
        console.warn(w)
    if not report.passed:
        human += "\n\ngates:\n" + console.table(GATE_HEADERS, gate_rows(report))
        emit_report(report, as_json, human)
        raise ValidationFailed(failure_line(report, candidate, report_dir), report=report)
    emit_report(report, as_json, human)
