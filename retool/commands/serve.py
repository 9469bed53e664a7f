"""retool serve, retool repo check, retool loadtest: a real Triton on what retool publishes."""
from __future__ import annotations

import click

from retool.publish.signing import require_signed, trust_options

_URL_HELP = ("HTTP URL of a running Triton (e.g. NVIDIA's container: http://localhost:8000) instead of starting "
             "the local one; it must serve this repository.")


def _version(v):
    from retool.publish.names import check_version

    return None if v is None else check_version(v)


@click.command("check")
@click.argument("repo_url", metavar="REPO")
@click.argument("name", required=False)
@click.option("--version", help="Version to check (default: the one Triton serves).")
@click.option("--url", help=_URL_HELP)
@click.option("--grpc-url", help="gRPC address of that Triton (default: its host, port 8001).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds for a model to become ready.")
@click.option("--startup-timeout", type=float, default=60.0, show_default=True, help="Seconds for the server to start.")
@trust_options
@click.option("--json", "as_json", is_flag=True)
def repo_check(repo_url, name, version, url, grpc_url, timeout, startup_timeout, require_signature, trust_key, as_json):
    """Load NAME (or every model) in a real Triton and prove parity through it over HTTP and gRPC.

    A decoder with a KV cache is checked by a greedy generation, every step one request (the
    prefill with an empty past), against onnxruntime in-process and the tokens stored at publish
    (a quantized one also against its fp32 reference's teacher-forced gate).

    Exits 7 with Triton's reason when a model does not load, 6 when its answers differ from the
    samples stored at publish time, 8/9 when the server fails or is not ready in time.
    """
    from retool.errors import RetoolError
    from retool.serve.check import check, render, to_json
    from retool.serve.server import install_signal_handlers, positive_seconds

    timeout = positive_seconds(timeout, "--timeout")
    startup_timeout = positive_seconds(startup_timeout, "--startup-timeout")
    require_signed(repo_url, [name] if name else (), trust_key, require_signature)
    install_signal_handlers()
    try:
        report = check(repo_url, name, _version(version), url=url, grpc_url=grpc_url, timeout=timeout,
                       startup_timeout=startup_timeout)
    except RetoolError as exc:
        if isinstance(getattr(exc, "report", None), dict):  # what passed and what did not, then the one line
            click.echo(to_json(exc.report) if as_json else render(exc.report))
        raise
    click.echo(to_json(report) if as_json else render(report))


@click.command("serve")
@click.argument("repo_url", metavar="REPO")
@click.option("--model", "models", multiple=True, help="Load only these models (default: all). Repeatable.")
@click.option("--http-port", type=int, help="HTTP port (default: a free one).")
@click.option("--grpc-port", type=int, help="gRPC port (default: a free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds for each model to load.")
@click.option("--startup-timeout", type=float, default=60.0, show_default=True)
@trust_options
def serve_cmd(repo_url, models, http_port, grpc_port, host, timeout, startup_timeout, require_signature, trust_key):
    """Serve a model repository (a folder, or s3://... pulled to a cache) in a local Triton until Ctrl-C."""
    import time

    from retool import console
    from retool.errors import ServingError
    from retool.publish import open_repo
    from retool.publish.names import check_model_name
    from retool.serve.server import check_host, check_port, install_signal_handlers, positive_seconds
    from retool.serve.session import open_session

    timeout = positive_seconds(timeout, "--timeout")
    startup_timeout = positive_seconds(startup_timeout, "--startup-timeout")
    for port, flag in ((http_port, "--http-port"), (grpc_port, "--grpc-port")):
        if port is not None:
            check_port(port, check_host(host), flag)
    for m in models:
        check_model_name(m)
    install_signal_handlers()
    names = list(models) or open_repo(repo_url).models()
    require_signed(repo_url, names, trust_key, require_signature)  # before any server starts
    with open_session(repo_url, http_port=http_port, grpc_port=grpc_port, host=host,
                      startup_timeout=startup_timeout) as sess:
        for n in names:
            with console.step(f"loading {n}"):
                sess.load(n, timeout=timeout)
        try:  # from the first line printed on, Ctrl-C is the normal end
            click.echo(f"Triton (pid {sess.server.pid}) serves {len(names)} model(s) from {sess.repository}")
            click.echo(f"  HTTP  {sess.http_url}   (e.g. curl {sess.http_url}/v2/models/{names[0] if names else 'NAME'})")
            click.echo(f"  gRPC  {sess.grpc_url}")
            click.echo(f"  log   {sess.server.log_path}")
            click.echo(f"  note  {sess.backend_note}")
            click.echo("Ctrl-C stops it.", err=True)
            while sess.server.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            click.echo("stopping Triton …", err=True)
            return
        # read now: the log's folder goes away with the server
        died = ServingError(f"tritonserver (pid {sess.server.pid}) exited with code {sess.server.proc.returncode}: "
                            f"{sess.server.reason()}")
    raise died
