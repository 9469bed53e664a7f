"""The ``retool`` command. Subcommands are imported only when invoked, so --help stays fast."""
from __future__ import annotations

import importlib
import sys

import click

from retool import __version__
from retool.errors import RetoolError

#: name -> "module:attr". Adding a command is one module plus one line here.
COMMANDS = {
    "convert": "retool.commands.convert:convert_cmd",
    "optimize": "retool.commands.optimize:optimize_cmd",
    "targets": "retool.commands.optimize:targets_cmd",
    "validate": "retool.commands.validate:validate_cmd",
    "publish": "retool.commands.publish:publish_cmd",
    "repo": "retool.commands.publish:repo_group",
    "run": "retool.commands.run:run_cmd",
    "serve": "retool.commands.serve:serve_cmd",
    "loadtest": "retool.commands.loadtest:loadtest_cmd",
    "plan": "retool.commands.plan:plan_cmd",
    "deploy": "retool.commands.deploy:deploy_group",
}

_HELP = {
    "convert": "Convert a PyTorch, TensorFlow/Keras or Caffe model to ONNX, verified.",
    "optimize": "Optimise an ONNX model for a target (graph, int8, fp16).",
    "targets": "List the optimisation targets.",
    "validate": "Parity, latency and gates: is this model ready for production?",
    "publish": "Publish an artifact to a Triton model repository.",
    "repo": "List, show, verify, diff, promote, roll back and check (in Triton) a model repository.",
    "run": "Run a retool.yaml pipeline: convert, optimise, validate, publish.",
    "serve": "Serve a model repository in a real local Triton until Ctrl-C.",
    "loadtest": "Load-test a served model with perf_analyzer; pick the config for a p99 budget.",
    "plan": "Plan serving for a p99 budget and a rate: variant, config, replicas, cost.",
    "deploy": "Deploy a serving plan: KServe or plain Kubernetes manifests, a Model Analyzer config.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # command not built yet
                return None
            raise
        return getattr(mod, attr)

    def format_commands(self, ctx, formatter):
        # Short help from the table above: listing commands must not import them.
        rows = [(n, _HELP.get(n, "")) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


EPILOG = ("Exit codes: 0 ok, 1 bug, 2 usage, 3 missing optional dependency, 4 conversion failed, "
          "5 optimisation failed, 6 validation gate failed, 7 publish failed, "
          "8 inference server failed, 9 server or model not ready in time.")


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="retool")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def cli(quiet: bool) -> None:
    """retool: retool trained models for production serving."""
    from retool import console

    console.set_quiet(quiet)


def normalize_argv(argv):
    """``-q`` works after the subcommand and ``--json`` before it: both are moved where click expects them."""
    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)
    head, tail = args[:end], args[end:]
    quiet = [a for a in head if a in ("-q", "--quiet")]
    rest = [a for a in head if a not in ("-q", "--quiet")]
    first_cmd = next((i for i, a in enumerate(rest) if a in COMMANDS), None)
    if first_cmd is not None and "--json" in rest[:first_cmd]:
        rest = [a for i, a in enumerate(rest) if not (a == "--json" and i < first_cmd)] + ["--json"]
    return quiet + rest + tail


def main(argv=None) -> int:
    """Entry point: known errors become one line on stderr and their exit code."""
    try:
        rv = cli.main(args=normalize_argv(argv), prog_name="retool", standalone_mode=False)
        if isinstance(rv, int):  # ctx.exit(code) returns here when standalone_mode is off
            return rv
    except RetoolError as exc:
        click.echo(f"retool: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("retool: aborted", err=True)
        return 130
    except click.ClickException as exc:  # one line, like every other usage error
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, click.UsageError) and ctx else ""
        click.echo(f"retool: error: {' '.join(exc.format_message().split())}{hint}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("retool: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return 0


def run() -> None:
    """The ``retool`` command: main(), then leave without the final cyclic collection of everything the command
    imported (sigstore, grpc, torch): measured 0.2-0.4 s of a verify's wall time, for memory the OS frees anyway.
    Exit handlers and finalizers still run. Not after onnxsim: nanobind reports its still-frozen objects as leaks."""
    code = main()
    if "onnxsim" not in sys.modules:
        import gc

        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
