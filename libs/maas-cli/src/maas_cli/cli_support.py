"""What every `maas` command shares: global options, the SDK client, output, one-line errors.

Global options (`--target`, `--token`, `--state-dir`, TLS, `--json`, ...) are declared once
on the root command and may also be written after the subcommand: `MaasGroup` moves them
to the front before parsing. Commands print through `Output`: a rich table, tree or text
for people, or one JSON document with `--json`. Any failure becomes one line on stderr and
a non-zero exit code, never a traceback:

    error: NOT_FOUND (RESOURCE_NOT_FOUND): model 'models/ghost' not found
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from maas_sdk.errors import MaasError, one_line
from rich.console import Console
from rich.table import Table
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer's bundled click (pinned)
from typer.core import TyperGroup

from maas_cli.suite_state import SuiteAlreadyRunning

GLOBAL_OPTIONS_WITH_VALUE = frozenset({"--target", "--token", "--state-dir", "--ca", "--cert",
                                       "--key", "--server-name", "--consul", "--timeout"})
GLOBAL_FLAGS = frozenset({"--json"})
EXIT_CODES = {"INVALID_ARGUMENT": 2, "UNAUTHENTICATED": 3, "PERMISSION_DENIED": 3,
              "NOT_FOUND": 4, "UNAVAILABLE": 5, "DEADLINE_EXCEEDED": 5}
"""Exit codes by status code; every other failure exits 1 (click's usage errors exit 2)."""


def hoist_global_options(args: Sequence[str]) -> list[str]:
    """`args` with the global options (wherever they were written) moved to the front, so
    `maas models list --json` means `maas --json models list`. Stops at `--`."""
    hoisted: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest.extend(args[index:])
            break
        name = arg.split("=", 1)[0]
        if arg in GLOBAL_FLAGS:
            hoisted.append(arg)
        elif name in GLOBAL_OPTIONS_WITH_VALUE and "=" in arg:
            hoisted.append(arg)
        elif arg in GLOBAL_OPTIONS_WITH_VALUE and index + 1 < len(args):
            hoisted.extend(args[index:index + 2])
            index += 1
        else:
            rest.append(arg)
        index += 1
    return hoisted + rest


@dataclass
class CliState:
    """The global options of one invocation, and the client made from them on first use."""

    target: str | None = None
    token: str | None = None
    state_dir: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""
    consul: str | None = None
    timeout: float = 60.0
    json: bool = False
    _client: Any = field(default=None, repr=False)

    def client(self) -> Any:
        """The `maas.Client` these options describe (made on first use; see `close`)."""
        if self._client is None:
            from maas_sdk.client import Client

            self._client = Client(self.target, token=self.token, state_dir=self.state_dir,
                                  ca_file=self.ca, cert_file=self.cert, key_file=self.key,
                                  server_name=self.server_name, consul=self.consul,
                                  timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def output(self) -> Output:
        return Output(self.json)


def state(ctx: typer.Context) -> CliState:
    return ctx.find_object(CliState) or CliState()


class Output:
    """Prints for people (rich) or for programs (`--json`: one JSON document on stdout)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.console = Console(highlight=False, soft_wrap=True)

    def emit(self, data: Any, render: Callable[[Console], None] | None = None) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(plain(data), indent=2, default=str) + "\n")
        elif render is not None:
            render(self.console)
        else:
            self.console.print(plain(data))

    def table(self, rows: Iterable[dict[str, Any]], columns: Sequence[str], *,
              title: str = "", data: Any = None) -> None:
        """Rows as a table; with `--json`, `data` (default the rows) as JSON."""
        rows = list(rows)
        if self.as_json:
            self.emit(rows if data is None else data)
            return
        table = Table(title=title or None, show_edge=False, header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(row.get(column)) for column in columns))
        self.console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key}={_cell(item)}" for key, item in value.items())
    return str(value)


def plain(data: Any) -> Any:
    """Messages as their JSON form (proto field names), recursively through lists/dicts."""
    if isinstance(data, Message):
        return json_format.MessageToDict(data, preserving_proto_field_name=True)
    if isinstance(data, dict):
        return {key: plain(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [plain(item) for item in data]
    return data


def fail(message: str, code: int = 1, *, details: dict[str, Any] | None = None,
         as_json: bool = False) -> NoReturn:
    """Print one line on stderr and exit with `code`."""
    if as_json:
        line = json.dumps({"error": details or {"message": message}}, default=str)
    else:
        line = "error: " + " ".join(message.split())
    typer.echo(line, err=True)
    raise typer.Exit(code)


def _error_details(error: MaasError) -> dict[str, Any]:
    return {"code": error.code, "reason": error.reason, "message": error.message,
            "metadata": error.metadata,
            "field_violations": [{"field": v.field, "description": v.description}
                                 for v in error.field_violations]}


def _usage_error(error: UsageError, as_json: bool) -> NoReturn:
    """A usage mistake (unknown command, missing argument) as one line too; bare `maas` (or
    a bare command group) still shows its help."""
    if isinstance(error, NoArgsIsHelpError):
        raise error
    hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
    message = error.format_message()
    fail(f"INVALID_ARGUMENT: {message}{hint}", 2, as_json=as_json,
         details={"code": "INVALID_ARGUMENT", "message": message})


class MaasGroup(TyperGroup):
    """The root command: global options anywhere on the line, failures as one line."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None,
                     **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except UsageError as error:
            _usage_error(error, as_json="--json" in args)

    def invoke(self, ctx: Any) -> Any:
        as_json = bool(ctx.params.get("json_output"))
        try:
            return super().invoke(ctx)
        except UsageError as error:
            _usage_error(error, as_json)
        except MaasError as error:
            fail(one_line(error), EXIT_CODES.get(error.code, 1), details=_error_details(error),
                 as_json=as_json)
        except FileNotFoundError as error:
            fail(f"NOT_FOUND: no such file: {error.filename or error}", 4, as_json=as_json,
                 details={"code": "NOT_FOUND", "message": f"no such file: {error.filename or error}"})
        except SuiteAlreadyRunning as error:
            fail(f"FAILED_PRECONDITION: {error}", 1, as_json=as_json,
                 details={"code": "FAILED_PRECONDITION", "message": str(error)})
        except (OSError, ValueError) as error:
            message = str(error) or type(error).__name__
            fail(f"INVALID_ARGUMENT: {message}", 2, as_json=as_json,
                 details={"code": "INVALID_ARGUMENT", "message": message})

