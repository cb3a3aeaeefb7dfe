"""`maas`: run the suite on one machine, run the demo, manage tokens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from maas_runtime.auth import Role, add_token

from maas_cli.local_suite import LocalSuite


async def _up(root: Path) -> None:
    suite = LocalSuite(root)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await suite.start()  # stops what it started if it fails
    try:
        for service in suite.services.values():
            print(f"{service.name:10s} {service.target}   logs: {service.log_file}", flush=True)
        print(f"admin token: {suite.admin_token_file}   (Ctrl-C stops the suite)", flush=True)
        await stop.wait()
    finally:
        await suite.stop()


async def _demo(root: Path) -> int:
    from maas_cli.demo import run_demo

    suite = LocalSuite(root)
    print(f"starting the suite under {root} …", flush=True)
    await suite.start()
    try:
        result = await run_demo(suite)
    finally:
        await suite.stop()
    ok = result["predict_accuracy"] >= 0.9
    print(f"demo {'passed' if ok else 'FAILED'}: {result}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maas", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path(".maas"),
                        help="root of the suite's state (default .maas)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run registry, trainer and inference (with Triton) locally")
    commands.add_parser("demo", help="train, register, deploy and query digits end to end")
    token = commands.add_parser("token", help="mint a token")
    token.add_argument("principal")
    token.add_argument("--role", choices=["viewer", "editor", "admin"], default="viewer")
    token.add_argument("--model", action="append", default=[], help="model id pattern scope")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "up":
        asyncio.run(_up(args.state_dir))
        return 0
    if args.command == "demo":
        return asyncio.run(_demo(args.state_dir))
    print(add_token(args.state_dir / "tokens.json", args.principal, Role.parse(args.role),
                    args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
