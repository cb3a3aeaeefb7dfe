"""The main job, `maas demo`: the whole model lifecycle on a fresh local suite, through the SDK.

On a `LocalSuite` (registry, trainer, compressor, inference + Triton) and with `maas.Client`
only: train a CNN on scikit-learn's 8×8 digits (`builtin:digits`) and a second short run
from the same seed; compress the CNN four ways in the compressor service (structured prune
with fine-tuning, int8 ONNX, a distilled MLP student, a greedy soup with the second run),
each registered with lineage behind an accuracy gate; point `production` at the best version
that passed (`choose_production`); deploy it with a 90/10 canary against the fp32 CNN and a
shadow; send the held-out digits through the gateway in batches; print one table, the
lineage tree and the wall time (or all of it as JSON), then stop the suite.

A step that fails (its gate, or anything else) is a row marked failed with one line of
reason; only a failed training run or serving ends the demo early, with one line.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from maas.common.v1 import job_pb2
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from maas_cli.local_suite import LocalSuite, SuiteTls

MODEL = "digits"
DEPLOYMENT = "digits"
TRAIN = {"arch": "cnn", "hyperparameters": {"channels": [16, 32]}, "epochs": 8,
         "learning_rate": 0.003, "seed": 0}
SECOND_RUN = {**TRAIN, "epochs": 4, "learning_rate": 0.002}
"""Same architecture and seed (so the same initial weights) as the CNN: a soup ingredient."""
MAX_ACCURACY_DROP = 2.0
"""Points of held-out accuracy a compressed version may lose and still pass its gate."""
CANARY_PERCENT = 10
BATCH = 8
PASSES = 10
"""The held-out digits (359) are sent this many times: 3,590 predictions in 450 requests."""
WIDTH_PIPED = 160
SELECTION_RULE = ("production = the compressed version that passed its gate with the highest "
                  "held-out accuracy; ties go to the smaller artifact, then the lower p50 latency")


class DemoFailed(Exception):
    """A stage the rest of the demo depends on failed; the message is the one line to print."""


@dataclass
class Row:
    """One version in the demo's table."""

    method: str
    version: str = ""
    parameters: int | None = None
    size_bytes: int | None = None
    accuracy: float | None = None
    """Held-out accuracy, 0-1, as the compressor measures every version (same split)."""
    latency_ms_p50: float | None = None
    """Median batch-1 latency on one CPU thread as the compressor measures it."""
    runtime: str = ""
    compressed: bool = False
    gate: str = "n/a"
    """"passed", "failed" or "n/a" (not compressed)."""
    accuracy_drop: float | None = None
    error: str = ""
    role: str = ""
    """"production 90%", "canary 10%", "shadow" or ""."""
    requests_served: int = 0
    predictions_served: int = 0
    served_accuracy: float | None = None
    gateway_p50_ms: float | None = None
    shadow_agreement: float | None = None


@dataclass
class DemoResult:
    """Everything the demo measured; `to_json` is what `maas demo --json` prints."""

    model: str = f"models/{MODEL}"
    trained: str = ""
    production: str = ""
    selection_rule: str = SELECTION_RULE
    rows: list[Row] = field(default_factory=list)
    deployment: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    """One tree per origin version (the CNN, the second run), derived versions below."""
    lineage_edges: list[list[str]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and any(row.role.startswith("production") for row in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, **asdict(self)}


def held_out_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fifth of scikit-learn's 8×8 digits (359 of 1,797), as float32 features and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    test = order[: int(len(order) * test_fraction)]
    return digits.data[test].astype(np.float32), digits.target[test]


def choose_production(rows: list[Row]) -> Row | None:
    """The gated version with the highest accuracy, then the smallest, then the fastest."""
    passed = [row for row in rows if row.compressed and row.gate == "passed" and row.version]
    if not passed:
        return None
    return max(passed, key=lambda row: (row.accuracy or 0.0, -(row.size_bytes or 0),
                                        -(row.latency_ms_p50 or 0.0)))


def choose_shadow(rows: list[Row], serving: set[str]) -> Row | None:
    """The runner-up by the same rule, among versions not already taking traffic."""
    rest = [row for row in rows if row.version not in serving]
    return choose_production(rest) or next(
        (row for row in rest if row.version and row.compressed), None)


class Demo:
    """The demo's flow on one `maas.Client`; `log` receives one progress line at a time."""

    def __init__(self, client: Any, log: Callable[[str], None]):
        self.client = client
        self.log = log
        self.result = DemoResult()

    def run(self) -> DemoResult:
        try:
            self._phase("train", self.train)
            self._phase("compress", self.compress)
            self._phase("deploy", self.deploy)
            self._phase("predict", self.predict)
            self._phase("lineage", self.lineage)
        except DemoFailed as failure:
            self.result.error = str(failure)
        return self.result

    def _phase(self, name: str, step: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            step()
        finally:
            self.result.phases[name] = round(time.monotonic() - started, 1)

    # Train ----------------------------------------------------------------------------------

    def train(self) -> None:
        import maas

        self.log(f"1/5 training a CNN {TRAIN['hyperparameters']} on builtin:digits for "
                 f"{TRAIN['epochs']} epochs, and a {SECOND_RUN['epochs']}-epoch second run "
                 "from the same seed (a soup ingredient)")
        runs = [("train (fp32)", {"alias": "fp32", "min_test_accuracy": 0.9, **TRAIN}),
                ("train (2nd run)", SECOND_RUN)]
        versions = []
        for method, arguments in runs:  # one after the other: the CNN is version 1
            try:
                done = self.client.wait(self.client.train(dataset="builtin:digits", model=MODEL,
                                                          **arguments))
            except maas.MaasError as error:
                raise DemoFailed(f"training failed: {error}") from None
            version = self.client.get_version(done.model_version)
            versions.append(version.name)
            self.result.rows.append(Row(method, version.name, size_bytes=version.artifact.size_bytes,
                                        accuracy=version.metrics.get("test_accuracy")))
            self.log(f"    {version.name}: test accuracy {version.metrics['test_accuracy']:.4f}")
        self.result.trained, self.second_run = versions

    # Compress -------------------------------------------------------------------------------

    def compress(self) -> None:
        import maas

        plans = [
            ("prune", "prune:amount=0.5,structured=true,finetune_epochs=3"),
            ("quantize int8", "quantize:dtype=int8"),
            ("distill", 'distill:epochs=20,learning_rate=0.01,student={"kind":"mlp",'
                        '"hyperparameters":{"hidden_sizes":[64]}}'),
            ("fuse", f'fuse:method=greedy_soup,model_versions=["{self.second_run}"]'),
        ]
        self.log(f"2/5 compressing {self.result.trained} four ways, each gated at "
                 f"max_accuracy_drop={MAX_ACCURACY_DROP} points")
        started: list[tuple[Row, Any]] = []
        for method, step in plans:
            row = Row(method, compressed=True)
            self.result.rows.append(row)
            try:
                started.append((row, self.client.compress(
                    self.result.trained, [step], output=MODEL,
                    max_accuracy_drop=MAX_ACCURACY_DROP)))
            except maas.MaasError as error:
                row.gate, row.error = "failed", str(error)
                self.log(f"    {method}: not started: {error}")
        for row, job in started:
            done = self.client.wait(job, check=False)
            report = done.report
            if report.HasField("after"):
                row.parameters, row.size_bytes = report.after.parameters, report.after.size_bytes
                row.accuracy, row.latency_ms_p50 = report.after.accuracy, report.after.latency_ms
                row.runtime, row.accuracy_drop = report.after.runtime, report.accuracy_drop
            if report.HasField("before"):
                self._measure_trained(report.before)
            if done.state == job_pb2.JOB_STATE_SUCCEEDED:
                row.version, row.gate = done.model_version, "passed"
                self.log(f"    {row.method}: {row.version}  accuracy {row.accuracy:.4f}  "
                         f"size {_size(row.size_bytes)}  gate passed")
            else:
                row.gate = "failed"
                row.error = f"{done.error.code} {done.error.message}".strip()
                self.log(f"    {row.method}: failed: {row.error}")

    def _measure_trained(self, before: Any) -> None:
        """The trained CNN as the compressor measured it (the same split as the others)."""
        trained = self.result.rows[0]
        trained.parameters, trained.size_bytes = before.parameters, before.size_bytes
        trained.accuracy, trained.latency_ms_p50 = before.accuracy, before.latency_ms
        trained.runtime = before.runtime

    # Deploy ---------------------------------------------------------------------------------

    def deploy(self) -> None:
        import maas

        best = choose_production(self.result.rows)
        production = best.version if best else self.result.trained
        self.result.production = production
        self.log(f"3/5 {SELECTION_RULE}")
        self.log(f"    → production = {production}"
                 + (f" ({best.method})" if best else " (no compressed version passed: the CNN)"))
        rows = {row.version: row for row in self.result.rows if row.version}
        try:
            self.client.set_alias(MODEL, "production", production)
            self.client.deploy(DEPLOYMENT, f"{MODEL}@production", track_alias=False,
                               replace=True)
            traffic = {production: 100}
            if production != self.result.trained:
                traffic = {production: 100 - CANARY_PERCENT, self.result.trained: CANARY_PERCENT}
                self.client.split_traffic(DEPLOYMENT, traffic)
            shadow = choose_shadow(self.result.rows, set(traffic))
            if shadow is not None:
                self.client.shadow(DEPLOYMENT, shadow.version, 100)
        except maas.MaasError as error:
            raise DemoFailed(f"deploying {production} failed: {error}") from None
        for version, percent in traffic.items():
            rows[version].role = ("production" if version == production else "canary") + \
                f" {percent}%"
        if shadow is not None:
            shadow.role = "shadow"
        self.result.deployment = {
            "name": f"deployments/{DEPLOYMENT}", "traffic": traffic,
            "shadow": shadow.version if shadow else ""}
        self.log(f"    deployments/{DEPLOYMENT}: "
                 + ", ".join(f"{v} {p}%" for v, p in traffic.items())
                 + (f", shadow {shadow.version}" if shadow else ""))

    # Predict --------------------------------------------------------------------------------

    def predict(self) -> None:
        import maas

        features, labels = held_out_digits()
        self.log(f"4/5 sending {PASSES}× the {len(labels)} held-out digits through the gateway "
                 f"in batches of {BATCH} (SDK predict)")
        latencies: dict[str, list[float]] = {}
        correct: dict[str, int] = {}
        predictions: dict[str, int] = {}
        requests = 0
        try:
            for repeat in range(PASSES):
                for start in range(0, len(labels), BATCH):
                    rows = features[start:start + BATCH]
                    began = time.perf_counter()
                    answer = self.client.predict_detailed(
                        DEPLOYMENT, rows, request_id=f"demo-{repeat}-{start}")
                    elapsed = (time.perf_counter() - began) * 1000
                    version = answer.model_version
                    latencies.setdefault(version, []).append(elapsed)
                    logits = next(iter(answer.outputs.values()))
                    correct[version] = correct.get(version, 0) + int(
                        (logits.argmax(1) == labels[start:start + BATCH]).sum())
                    predictions[version] = predictions.get(version, 0) + len(rows)
                    requests += 1
        except maas.MaasError as error:
            raise DemoFailed(f"predict failed after {requests} requests: {error}") from None
        for row in self.result.rows:
            if row.version in latencies:
                row.requests_served = len(latencies[row.version])
                row.predictions_served = predictions[row.version]
                row.served_accuracy = correct[row.version] / predictions[row.version]
                row.gateway_p50_ms = round(statistics.median(latencies[row.version]), 3)
        stats = self._settled_shadow_stats(requests)
        self.result.deployment.update(requests=requests, predictions=sum(predictions.values()),
                                      shadow_stats=stats)
        shadow = self.result.deployment.get("shadow")
        for row in self.result.rows:
            if shadow and row.version == shadow and stats["compared"]:
                row.shadow_agreement = stats["argmax_agreed"] / stats["compared"]
        self.log(f"    {requests} requests, {sum(predictions.values())} predictions; shadow "
                 f"compared {stats['compared']}, agreed {stats['argmax_agreed']}")

    def _settled_shadow_stats(self, requests: int, timeout: float = 20) -> dict[str, Any]:
        """The shadow's counters once its mirrored copies are all answered (they trail)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.client.get_deployment(DEPLOYMENT).shadow_stats
            settled = stats.compared + stats.errors >= requests
            if settled or time.monotonic() > deadline or not self.result.deployment.get("shadow"):
                return {"compared": stats.compared, "argmax_agreed": stats.argmax_agreed,
                        "max_abs_diff": stats.max_abs_diff, "errors": stats.errors}
            time.sleep(0.25)

    # Lineage --------------------------------------------------------------------------------

    def lineage(self) -> None:
        """The registry's lineage of every version in the table, merged into one forest (a
        soup has two parents: the CNN's tree alone would not show the second run)."""
        from maas.registry.v1 import audit_pb2
        from maas_sdk.lineage import LineageTree

        self.log("5/5 reading the lineage of every version from the registry")
        nodes: dict[str, audit_pb2.LineageNode] = {}
        edges: set[tuple[str, str]] = set()

        def collect(tree: LineageTree) -> None:
            if tree.name:
                nodes[tree.name] = audit_pb2.LineageNode(name=tree.name, operation=tree.operation,
                                                         job=tree.job)
            for child in tree.children:
                if tree.name:
                    edges.add((tree.name, child.name))
                collect(child)

        for row in self.result.rows:
            if row.version:
                collect(self.client.lineage(row.version))
        graph = audit_pb2.LineageGraph(
            root=self.result.trained, nodes=list(nodes.values()),
            edges=[audit_pb2.LineageEdge(parent=parent, child=child)
                   for parent, child in sorted(edges)])
        self.result.lineage = [tree.to_dict() for tree in LineageTree.from_graph(graph)]
        self.result.lineage_edges = [list(edge) for edge in sorted(edges)]


# Rendering ------------------------------------------------------------------------------------

def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "—"
    return f"{size_bytes / 1024:.1f} KiB" if size_bytes < 1024 * 1024 else \
        f"{size_bytes / 1024 / 1024:.2f} MiB"


def _short(version: str) -> str:
    return f"v{version.rsplit('/', 1)[-1]}" if version else "—"


def _number(value: float | None, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def render(result: DemoResult, console: Console) -> None:
    """The table, the lineage tree, the rule and the wall time."""
    table = Table(title=f"{result.model}: trained, compressed, served", title_justify="left")
    for column, justify in (("version", "left"), ("method", "left"), ("parameters", "right"),
                            ("size", "right"), ("accuracy", "right"), ("p50 ms (b1)", "right"),
                            ("gateway p50 ms", "right"), ("requests served", "right"),
                            ("shadow agreement", "right"), ("gate / role", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in result.rows:
        status = "[red]failed[/red]" if row.gate == "failed" else row.gate
        if row.role:
            status = f"{status} · [bold]{row.role}[/bold]" if row.compressed else f"[bold]{row.role}[/bold]"
        table.add_row(
            _short(row.version), row.method,
            "—" if row.parameters is None else f"{row.parameters:,}", _size(row.size_bytes),
            _number(row.accuracy and row.accuracy * 100, ".1f") + ("%" if row.accuracy else ""),
            _number(row.latency_ms_p50, ".3f"), _number(row.gateway_p50_ms, ".2f"),
            f"{row.requests_served:,}" if row.requests_served else "—",
            _number(row.shadow_agreement and row.shadow_agreement * 100, ".1f")
            + ("%" if row.shadow_agreement is not None else ""),
            status, style="bold" if row.version == result.production else None)
    console.print(table)
    for row in result.rows:
        if row.error:
            console.print(f"  [red]{row.method}[/red]: {row.error}", highlight=False)
    console.print(f"accuracy: held-out split as the compressor measures it; p50 ms (b1): one "
                  f"example, one CPU thread, in-process; gateway p50: one request of {BATCH} "
                  "through the inference gateway.", highlight=False)
    console.print(SELECTION_RULE + f" → {result.production or '—'}", highlight=False)
    rows = {row.version: row for row in result.rows}
    for origin in result.lineage:
        console.print(_lineage_tree(origin, rows))
    if result.error:
        console.print(f"[red]demo failed:[/red] {result.error}", highlight=False)
    phases = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in result.phases.items())
    console.print(f"wall time {result.wall_seconds:.1f}s ({phases})", highlight=False)


def _lineage_tree(node: dict[str, Any], rows: dict[str, Row]) -> Tree:
    def label(item: dict[str, Any]) -> str:
        row = rows.get(item["name"])
        how = f" [dim]({item['operation']})[/dim]" if item.get("operation") else ""
        what = f" {row.method}" if row else ""
        role = f" [bold]{row.role}[/bold]" if row and row.role else ""
        return f"{item['name'] or 'lineage'}{what}{how}{role}"

    tree = Tree(label(node))

    def add(branch: Tree, item: dict[str, Any]) -> None:
        for child in item["children"]:
            add(branch.add(label(child)), child)

    add(tree, node)
    return tree


def _console(stderr: bool = False) -> Console:
    """A console as wide as the terminal, or wide enough for the table when piped."""
    console = Console(stderr=stderr, highlight=False)
    return console if console.is_terminal else Console(stderr=stderr, highlight=False,
                                                       width=WIDTH_PIPED)


# Entry point ----------------------------------------------------------------------------------

async def run_demo(suite: LocalSuite, log: Callable[[str], None] = print) -> DemoResult:
    """The demo's flow against a running suite (the SDK's calls block: off the event loop)."""
    import asyncio

    import maas

    def flow() -> DemoResult:
        with maas.Client(state_dir=suite.root) as client:
            return Demo(client, log).run()

    return await asyncio.to_thread(flow)


async def run_demo_command(root: Path, tls: SuiteTls | None, as_json: bool) -> int:
    """`maas demo`: start a suite on `root`, run the demo, stop the suite, print; exit code."""
    started = time.monotonic()
    console = _console(stderr=as_json)
    log: Callable[[str], None] = lambda line: console.print(line, highlight=False)  # noqa: E731
    suite = LocalSuite(root, tls=tls)
    log(f"starting the suite under {root} …")
    suite_started = time.monotonic()
    await suite.start()
    up_seconds = time.monotonic() - suite_started
    try:
        result = await run_demo(suite, log)
    finally:
        stopping = time.monotonic()
        await suite.stop()
    result.phases = {"suite up": round(up_seconds, 1), **result.phases,
                     "shutdown": round(time.monotonic() - stopping, 1)}
    result.wall_seconds = round(time.monotonic() - started, 1)
    if as_json:
        print(json.dumps(result.to_json(), indent=2), flush=True)
    else:
        render(result, _console())
    return 0 if result.passed else 1
