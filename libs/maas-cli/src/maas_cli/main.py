"""`maas`: run the suite on one machine, run the demo, manage tokens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from maas_runtime.auth import Role, add_token

from maas_cli.local_suite import LocalSuite, SuiteTls


async def _up(root: Path, tls: SuiteTls | None) -> None:
    suite = LocalSuite(root, tls=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await suite.start()  # stops what it started if it fails
    try:
        for line in suite.describe():
            print(line, flush=True)
        print(f"admin token: {suite.admin_token_file}   (Ctrl-C stops the suite)", flush=True)
        await stop.wait()
    finally:
        await suite.stop()


async def _demo(root: Path, tls: SuiteTls | None) -> int:
    from maas_cli.demo import run_demo

    suite = LocalSuite(root, tls=tls)
    print(f"starting the suite under {root} …", flush=True)
    await suite.start()
    try:
        result = await run_demo(suite)
    finally:
        await suite.stop()
    ok = result["predict_accuracy"] >= 0.9
    print(f"demo {'passed' if ok else 'FAILED'}: {result}", flush=True)
    return 0 if ok else 1


def _add_tls_arguments(command: argparse.ArgumentParser) -> None:
    tls = command.add_argument_group(
        "TLS", "serve TLS on every port; the services dial each other with TLS too")
    tls.add_argument("--tls-cert", type=Path, help="PEM certificate every service serves "
                     "(must name 127.0.0.1, or see --tls-server-name)")
    tls.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    tls.add_argument("--tls-ca", type=Path, help="PEM CA bundle that signed the certificates")
    tls.add_argument("--mtls", action="store_true",
                     help="require client certificates signed by --tls-ca on every port")
    tls.add_argument("--tls-client-cert", type=Path,
                     help="certificate the services present to each other under mTLS "
                     "(default --tls-cert)")
    tls.add_argument("--tls-client-key", type=Path, help="PEM private key of --tls-client-cert")
    tls.add_argument("--tls-server-name", default="",
                     help="name to expect in the certificate instead of the host dialled")


def _suite_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SuiteTls | None:
    if not (args.tls_cert or args.tls_key or args.tls_ca):
        if args.mtls:
            parser.error("--mtls needs --tls-cert, --tls-key and --tls-ca")
        return None
    if not (args.tls_cert and args.tls_key and args.tls_ca):
        parser.error("TLS needs --tls-cert, --tls-key and --tls-ca together")
    return SuiteTls(args.tls_cert.resolve(), args.tls_key.resolve(), args.tls_ca.resolve(),
                    mutual=args.mtls,
                    client_cert_file=args.tls_client_cert.resolve() if args.tls_client_cert else None,
                    client_key_file=args.tls_client_key.resolve() if args.tls_client_key else None,
                    server_name=args.tls_server_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maas", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path(".maas"),
                        help="root of the suite's state (default .maas)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run registry, trainer, compressor and inference (with Triton) "
                                            "locally")
    demo = commands.add_parser("demo", help="train, register, deploy and query digits end to end")
    for command in (up, demo):
        _add_tls_arguments(command)
    token = commands.add_parser("token", help="mint a token")
    token.add_argument("principal")
    token.add_argument("--role", choices=["viewer", "editor", "admin"], default="viewer")
    token.add_argument("--model", action="append", default=[], help="model id pattern scope")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "up":
        asyncio.run(_up(args.state_dir, _suite_tls(parser, args)))
        return 0
    if args.command == "demo":
        return asyncio.run(_demo(args.state_dir, _suite_tls(parser, args)))
    print(add_token(args.state_dir / "tokens.json", args.principal, Role.parse(args.role),
                    args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
