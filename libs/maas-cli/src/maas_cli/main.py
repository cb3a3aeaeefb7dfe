"""`maas`: the suite from the shell — run it locally, register, train, compress, serve, predict.

Global options work before or after the subcommand (`maas --json models list` or
`maas models list --json`). Every command takes `--json` for machine-readable output. A
failure prints one line (`error: CODE (REASON): message (field: problem)`) on stderr and
exits non-zero: 2 invalid argument, 3 unauthenticated or permission denied, 4 not found,
5 unavailable, 1 otherwise. Shell completion: `maas --install-completion`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

import typer

from maas_cli import chat, commands
from maas_cli.cli_support import CliState, MaasGroup, fail
from maas_cli.local_suite import LocalSuite, SuiteTls

DEFAULT_STATE_DIR = Path(".maas")
"""Where `maas up` / `maas demo` keep the suite's state unless --state-dir says otherwise."""

HELP = " ".join(__doc__.split("\n\n", 1)[1].split())
"""The module docstring's body as one paragraph (rich re-wraps it)."""

app = typer.Typer(cls=MaasGroup, help=HELP, no_args_is_help=True,
                  pretty_exceptions_enable=False, context_settings={"max_content_width": 110})


@app.callback()
def global_options(
    ctx: typer.Context,
    target: str = typer.Option(None, envvar="MAAS_TARGET", help="host:port of every service, "
                               "or registry=host:port;inference=host:port;... (default: the "
                               "suite `maas up` runs on --state-dir, else the default ports)"),
    token: str = typer.Option(None, envvar="MAAS_TOKEN", help="bearer token (default: the "
                              "local suite's admin token)", show_default=False),
    state_dir: Path = typer.Option(None, envvar="MAAS_STATE_DIR", help="the local suite's state "
                                   "(default .maas, or .maas/local when only that exists)"),
    ca: Path = typer.Option(None, help="PEM CA bundle that signed the services' certificates"),
    cert: Path = typer.Option(None, help="PEM client certificate (mTLS)"),
    key: Path = typer.Option(None, help="PEM private key of --cert"),
    server_name: str = typer.Option("", help="name to expect in the certificate"),
    consul: str = typer.Option(None, help="find the services through this Consul agent"),
    timeout: float = typer.Option(60.0, help="deadline of each call, seconds"),
    json_output: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """The suite from the shell."""
    ctx.obj = CliState(target=target, token=token, state_dir=state_dir, ca=ca, cert=cert,
                       key=key, server_name=server_name, consul=consul, timeout=timeout,
                       json=json_output)
    ctx.call_on_close(ctx.obj.close)


app.add_typer(commands.models, name="models")
app.add_typer(commands.versions, name="versions")
app.add_typer(commands.datasets, name="datasets")
app.add_typer(commands.alias, name="alias")
app.add_typer(commands.jobs, name="jobs")
app.add_typer(commands.deployments, name="deployments")
app.add_typer(commands.token, name="token")
app.add_typer(commands.importer, name="import")
for command in (commands.lineage, commands.train, commands.compress, commands.deploy,
                commands.rollout, commands.predict, commands.usage, commands.status):
    app.command()(command)
app.command()(chat.chat)


# The local suite ----------------------------------------------------------------------------

_TLS_PANEL = "TLS (every port serves TLS; the services dial each other with TLS too)"


def _suite_tls(tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None, mtls: bool,
               tls_client_cert: Path | None, tls_client_key: Path | None,
               tls_server_name: str, as_json: bool) -> SuiteTls | None:
    if not (tls_cert or tls_key or tls_ca):
        if mtls:
            fail("INVALID_ARGUMENT: --mtls needs --tls-cert, --tls-key and --tls-ca", 2,
                 as_json=as_json)
        return None
    if not (tls_cert and tls_key and tls_ca):
        fail("INVALID_ARGUMENT: TLS needs --tls-cert, --tls-key and --tls-ca together", 2,
             as_json=as_json)
    return SuiteTls(tls_cert.resolve(), tls_key.resolve(), tls_ca.resolve(), mutual=mtls,
                    client_cert_file=tls_client_cert.resolve() if tls_client_cert else None,
                    client_key_file=tls_client_key.resolve() if tls_client_key else None,
                    server_name=tls_server_name)


_TLS_OPTIONS = dict(
    tls_cert=typer.Option(None, help="PEM certificate every service serves (must name "
                          "127.0.0.1, or see --tls-server-name)", rich_help_panel=_TLS_PANEL),
    tls_key=typer.Option(None, help="PEM private key of --tls-cert", rich_help_panel=_TLS_PANEL),
    tls_ca=typer.Option(None, help="PEM CA bundle that signed the certificates",
                        rich_help_panel=_TLS_PANEL),
    mtls=typer.Option(False, help="require client certificates signed by --tls-ca on every port",
                      rich_help_panel=_TLS_PANEL),
    tls_client_cert=typer.Option(None, help="certificate the services present to each other "
                                 "under mTLS (default --tls-cert)", rich_help_panel=_TLS_PANEL),
    tls_client_key=typer.Option(None, help="PEM private key of --tls-client-cert",
                                rich_help_panel=_TLS_PANEL),
    tls_server_name=typer.Option("", help="name to expect in the certificate instead of the "
                                 "host dialled", rich_help_panel=_TLS_PANEL),
)


async def _up(root: Path, tls: SuiteTls | None, as_json: bool) -> None:
    suite = LocalSuite(root, tls=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await suite.start()  # stops what it started if it fails
    try:
        if as_json:
            print(json.dumps({"services": {
                name: {"target": service.target, "metrics": service.metrics_url,
                       "log": str(service.log_file)} for name, service in suite.services.items()},
                "admin_token_file": str(suite.admin_token_file)}), flush=True)
        else:
            for line in suite.describe():
                print(line, flush=True)
            print(f"admin token: {suite.admin_token_file}   (Ctrl-C stops the suite)", flush=True)
        await stop.wait()
    finally:
        await suite.stop()


async def _demo(root: Path, tls: SuiteTls | None, as_json: bool) -> int:
    from maas_cli.demo import run_demo_command

    return await run_demo_command(root, tls, as_json)


@app.command()
def up(ctx: typer.Context,
       tls_cert: Path = _TLS_OPTIONS["tls_cert"], tls_key: Path = _TLS_OPTIONS["tls_key"],
       tls_ca: Path = _TLS_OPTIONS["tls_ca"], mtls: bool = _TLS_OPTIONS["mtls"],
       tls_client_cert: Path = _TLS_OPTIONS["tls_client_cert"],
       tls_client_key: Path = _TLS_OPTIONS["tls_client_key"],
       tls_server_name: str = _TLS_OPTIONS["tls_server_name"]):
    """Run registry, trainer, compressor and inference (with Triton) locally until Ctrl-C."""
    options: CliState = ctx.obj
    tls = _suite_tls(tls_cert, tls_key, tls_ca, mtls, tls_client_cert, tls_client_key,
                     tls_server_name, options.json)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    asyncio.run(_up(options.state_dir or DEFAULT_STATE_DIR, tls, options.json))


@app.command()
def demo(ctx: typer.Context,
         tls_cert: Path = _TLS_OPTIONS["tls_cert"], tls_key: Path = _TLS_OPTIONS["tls_key"],
         tls_ca: Path = _TLS_OPTIONS["tls_ca"], mtls: bool = _TLS_OPTIONS["mtls"],
         tls_client_cert: Path = _TLS_OPTIONS["tls_client_cert"],
         tls_client_key: Path = _TLS_OPTIONS["tls_client_key"],
         tls_server_name: str = _TLS_OPTIONS["tls_server_name"]):
    """Train, compress, gate, deploy (canary + shadow) and query digits on a fresh local suite."""
    options: CliState = ctx.obj
    tls = _suite_tls(tls_cert, tls_key, tls_ca, mtls, tls_client_cert, tls_client_key,
                     tls_server_name, options.json)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    code = asyncio.run(_demo(options.state_dir or DEFAULT_STATE_DIR, tls, options.json))
    if code:
        raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """The `maas` entry point; returns the exit code."""
    try:
        app(args=argv, prog_name="maas", standalone_mode=True)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
