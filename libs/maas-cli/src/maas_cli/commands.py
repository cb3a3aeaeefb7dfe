"""The `maas` commands that work on a running suite, each a few lines over `maas.Client`.

models / versions / datasets (list, get, upload, download, delete), alias set, lineage,
train and compress (live progress from the jobs' Watch streams), jobs (list, get, cancel),
deploy, rollout, deployments (list, get, delete), predict, usage, status and token.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import typer
from maas.common.v1 import job_pb2
from maas.inference.v1 import deployment_pb2
from maas.registry.v1 import dataset_pb2, model_pb2
from maas_sdk.errors import FieldViolation, InvalidArgument
from maas_sdk.jobs import JobProgress, compression_spec_from_document, parse_value, state_name
from maas_sdk.lineage import LineageTree
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.tree import Tree

from maas_cli.cli_support import fail, plain, state

models = typer.Typer(help="Registered models.", no_args_is_help=True)
versions = typer.Typer(help="Versions of a model (by number, name or alias).", no_args_is_help=True)
datasets = typer.Typer(help="Datasets and their versions.", no_args_is_help=True)
alias = typer.Typer(help="Aliases: movable names of versions (`models/m@production`).",
                    no_args_is_help=True)
jobs = typer.Typer(help="Training and compression jobs.", no_args_is_help=True)
deployments = typer.Typer(help="Deployments on Triton.", no_args_is_help=True)
token = typer.Typer(help="Tokens of the local suite (its tokens file under --state-dir).",
                    no_args_is_help=True)


# Models and versions ------------------------------------------------------------------------

def _version_row(version: model_pb2.ModelVersion) -> dict[str, Any]:
    return {"name": version.name, "format": model_pb2.ModelFormat.Name(version.format)
            .removeprefix("MODEL_FORMAT_").lower(),
            "aliases": list(version.aliases), "size": version.artifact.size_bytes,
            "accuracy": next((version.metrics[key] for key in ("test_accuracy", "accuracy")
                              if key in version.metrics), None),
            "operation": version.lineage.operation.kind, "creator": version.creator}


@models.command("list")
def models_list(ctx: typer.Context,
                filter: str = typer.Option("", help='AIP-160 filter, e.g. labels.team = "vision"')):
    """List models."""
    found = state(ctx).client().list_models(filter)
    state(ctx).output.table(
        ({"name": m.name, "latest": m.latest_version_id, "aliases": dict(m.aliases),
          "description": m.description} for m in found),
        ("name", "latest", "aliases", "description"), data=found)


@models.command("get")
def models_get(ctx: typer.Context, model: str = typer.Argument(..., help="e.g. digits")):
    """Show a model."""
    state(ctx).output.emit(state(ctx).client().get_model(model))


@models.command("delete")
def models_delete(ctx: typer.Context, model: str):
    """Delete a model (it must have no versions left)."""
    state(ctx).client().delete_model(model)
    state(ctx).output.emit({"deleted": model})


def _upload(ctx: typer.Context, model: str, file: Path, format: str | None, alias_name: str,
            example: Path | None, signature: Path | None, description: str) -> None:
    client = state(ctx).client()
    example_input = _load_array(example) if example else None
    described = _read_json(signature, "signature") if signature else None
    version = client.upload_model(model, file, format=format, signature=described,
                                  example_input=example_input, alias=alias_name,
                                  description=description)
    state(ctx).output.table([_version_row(version)], ("name", "format", "aliases", "size"),
                            data=version)


_FORMAT_HELP = "onnx, torchscript or maas-package (default: from the file's suffix)"
_EXAMPLE_HELP = ".npy example input (batch first) a TorchScript file is run on to infer its signature"


@models.command("upload")
def models_upload(ctx: typer.Context, model: str, file: Path,
                  format: str = typer.Option(None, help=_FORMAT_HELP),
                  alias_name: str = typer.Option("", "--alias", help="alias to point at it"),
                  example: Path = typer.Option(None, help=_EXAMPLE_HELP),
                  signature: Path = typer.Option(None, help="signature JSON file "
                                                 '({"inputs": [...], "outputs": [...]})'),
                  description: str = ""):
    """Register a model file (ONNX, TorchScript, maas-package) as a new version of MODEL."""
    _upload(ctx, model, file, format, alias_name, example, signature, description)


@models.command("download")
def models_download(ctx: typer.Context, version: str = typer.Argument(..., help="e.g. digits@production"),
                    destination: Path = typer.Argument(Path("."), help="file or directory")):
    """Download a version's artifact (verified against its sha256)."""
    path = state(ctx).client().download(version, destination)
    state(ctx).output.emit({"version": version, "path": str(path)})


@versions.command("list")
def versions_list(ctx: typer.Context, model: str,
                  filter: str = typer.Option("", help="AIP-160 filter over the versions")):
    """List the versions of MODEL."""
    found = state(ctx).client().list_versions(model, filter)
    state(ctx).output.table((_version_row(v) for v in found),
                            ("name", "format", "aliases", "size", "accuracy", "operation", "creator"),
                            data=found)


@versions.command("get")
def versions_get(ctx: typer.Context, version: str = typer.Argument(..., help="e.g. digits@production")):
    """Show a version (by name, number or alias)."""
    state(ctx).output.emit(state(ctx).client().get_version(version))


@versions.command("delete")
def versions_delete(ctx: typer.Context, version: str):
    """Delete a version (no alias may point at it)."""
    state(ctx).client().delete_version(version)
    state(ctx).output.emit({"deleted": version})


@versions.command("upload")
def versions_upload(ctx: typer.Context, model: str, file: Path,
                    format: str = typer.Option(None, help=_FORMAT_HELP),
                    alias_name: str = typer.Option("", "--alias", help="alias to point at it"),
                    example: Path = typer.Option(None, help=_EXAMPLE_HELP),
                    signature: Path = typer.Option(None, help="signature JSON file"),
                    description: str = ""):
    """Same as `models upload`: a file as a new version of MODEL."""
    _upload(ctx, model, file, format, alias_name, example, signature, description)


versions.command("download", help="Download a version's artifact (verified).")(models_download)


importer = typer.Typer(help="Import models made elsewhere.", no_args_is_help=True)


@importer.command("hf")
def import_hf(ctx: typer.Context, directory: Path,
              model: str = typer.Option(..., "--model", help="model to add the version to"),
              alias_name: str = typer.Option("", "--alias", help="alias to point at it"),
              description: str = ""):
    """A Hugging Face model directory (config, model.safetensors or model.onnx, tokenizer) as
    an HF_TRANSFORMER version of MODEL: text in, normalized embedding out. No pickle, offline."""
    version = state(ctx).client().import_hf(directory, model, alias=alias_name,
                                            description=description)
    state(ctx).output.table([_version_row(version)], ("name", "format", "aliases", "size"),
                            data=version)


@importer.command("gguf")
def import_gguf(ctx: typer.Context, file: Path,
                model: str = typer.Option(..., "--model", help="model to add the versions to"),
                bf16: bool = typer.Option(True, "--bf16/--no-bf16",
                                          help="also register its bf16 safetensors conversion"),
                alias_name: str = typer.Option("", "--alias", help="alias to point at it"),
                description: str = ""):
    """A GGUF file as a GGUF version of MODEL (architecture, context length, vocabulary,
    quantization read from its header, nothing executed) and, unless --no-bf16, its bf16
    safetensors conversion as a CAUSAL_LM version with lineage to it: text in, tokens out."""
    imported = state(ctx).client().import_gguf(file, model, bf16=bf16, alias=alias_name,
                                               description=description)
    state(ctx).output.table([_version_row(v) for v in imported.versions],
                            ("name", "format", "aliases", "size"), data=imported.versions)


@importer.command("causal-lm")
def import_causal_lm(ctx: typer.Context, directory: Path,
                     model: str = typer.Option(..., "--model", help="model to add the version to"),
                     alias_name: str = typer.Option("", "--alias", help="alias to point at it"),
                     description: str = ""):
    """A Hugging Face causal-LM directory (config, model.safetensors, tokenizer.json, chat
    template) as a CAUSAL_LM version of MODEL: text in, tokens out. No pickle, offline."""
    version = state(ctx).client().import_causal_lm(directory, model, alias=alias_name,
                                                   description=description)
    state(ctx).output.table([_version_row(version)], ("name", "format", "aliases", "size"),
                            data=version)


# Datasets -----------------------------------------------------------------------------------

def _dataset_version_row(version: dataset_pb2.DatasetVersion) -> dict[str, Any]:
    return {"name": version.name, "format": dataset_pb2.DatasetFormat.Name(version.format)
            .removeprefix("DATASET_FORMAT_").lower(), "rows": version.row_count,
            "features": list(version.schema.feature_shape), "classes": version.schema.num_classes,
            "size": version.artifact.size_bytes}


@datasets.command("list")
def datasets_list(ctx: typer.Context, dataset: str = typer.Argument(
        None, help="list this dataset's versions instead")):
    """List datasets (or the versions of DATASET)."""
    client = state(ctx).client()
    if dataset:
        found_versions = client.list_dataset_versions(dataset)
        state(ctx).output.table((_dataset_version_row(v) for v in found_versions),
                                ("name", "format", "rows", "features", "classes", "size"),
                                data=found_versions)
        return
    found = client.list_datasets()
    state(ctx).output.table(({"name": d.name, "latest": d.latest_version_id,
                              "description": d.description} for d in found),
                            ("name", "latest", "description"), data=found)


@datasets.command("get")
def datasets_get(ctx: typer.Context, dataset: str = typer.Argument(
        ..., help="datasets/d, or a version: datasets/d/versions/1")):
    """Show a dataset or a dataset version."""
    client = state(ctx).client()
    found = (client.get_dataset_version(dataset) if "/versions/" in dataset
             else client.get_dataset(dataset))
    state(ctx).output.emit(found)


@datasets.command("upload")
def datasets_upload(ctx: typer.Context, dataset: str, file: Path,
                    label_column: str = typer.Option("label", help="the label array/column"),
                    feature_column: str = typer.Option("features", help="the npz features array"),
                    description: str = ""):
    """Register an .npz (features + label arrays) or .csv file as a new dataset version."""
    version = state(ctx).client().upload_dataset(dataset, file, label_column=label_column,
                                                 feature_column=feature_column,
                                                 description=description)
    state(ctx).output.table([_dataset_version_row(version)],
                            ("name", "format", "rows", "features", "classes"), data=version)


@datasets.command("download")
def datasets_download(ctx: typer.Context, version: str = typer.Argument(
        ..., help="datasets/d/versions/1"), destination: Path = typer.Argument(Path("."))):
    """Download a dataset version (verified against its sha256)."""
    reference = version if version.startswith("datasets/") else f"datasets/{version}"
    path = state(ctx).client().download(reference, destination)
    state(ctx).output.emit({"version": reference, "path": str(path)})


@datasets.command("delete")
def datasets_delete(ctx: typer.Context, dataset: str):
    """Delete a dataset."""
    state(ctx).client().delete_dataset(dataset)
    state(ctx).output.emit({"deleted": dataset})


# Aliases and lineage ------------------------------------------------------------------------

@alias.command("set")
def alias_set(ctx: typer.Context, model: str, alias_name: str = typer.Argument(..., metavar="ALIAS"),
              version: str = typer.Argument(..., help="version number or name")):
    """Point MODEL@ALIAS at VERSION."""
    moved = state(ctx).client().set_alias(model, alias_name, version)
    state(ctx).output.emit(moved, lambda console: console.print(f"{moved.name} → {moved.version}"))


def _rich_tree(tree: LineageTree, parent: Tree | None = None) -> Tree:
    label = tree.label() if tree.name else "lineage"
    label = f"[bold]{label}[/bold]" if tree.focus else label
    node = Tree(label) if parent is None else parent.add(label)
    for child in tree.children:
        _rich_tree(child, node)
    return node


def lineage(ctx: typer.Context, version: str = typer.Argument(
        ..., help="a model version or alias (digits@production) or datasets/d/versions/1")):
    """Draw a version's lineage: where it came from and what was derived from it."""
    tree = state(ctx).client().lineage(version)
    state(ctx).output.emit(tree.to_dict(), lambda console: console.print(_rich_tree(tree)))


# Jobs ---------------------------------------------------------------------------------------

class JobProgressBar:
    """A rich progress bar fed by a job's Watch events (epochs when known, else a spinner)."""

    def __init__(self, console: Console, name: str, total_epochs: int):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"),
                                 console=console, transient=False)
        self.task = self.progress.add_task(name, total=total_epochs or None, metrics="")
        self.name = name

    def __enter__(self) -> JobProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def __call__(self, event: JobProgress) -> None:
        if event.kind == "metrics":
            shown = "  ".join(f"{key} {value:.4f}" for key, value in sorted(event.metrics.items()))
            self.progress.update(self.task, completed=event.epoch or None,
                                 metrics=f"{event.phase} {shown}"[:60])
        elif event.kind == "state_change":
            self.progress.update(self.task, description=f"{self.name} {event.state.lower()}")
            if event.done and self.progress.tasks[0].total:
                self.progress.update(self.task, completed=self.progress.tasks[0].total)
        elif event.message:  # the latest log line, in place: library chatter never scrolls
            self.progress.update(self.task, metrics=" ".join(event.message.split())[:60])


def _follow(ctx: typer.Context, job, total_epochs: int) -> None:
    client, output = state(ctx).client(), state(ctx).output
    if output.as_json:
        output.emit(client.wait(job))
        return
    with JobProgressBar(output.console, job.name, total_epochs) as bar:
        final = client.wait(job, bar)
    output.console.print(f"{final.name}: {state_name(final.state).lower()}"
                         + (f" → {final.model_version}" if final.model_version else ""))


def train(ctx: typer.Context,
          dataset: str = typer.Option(..., help="builtin:digits or datasets/d/versions/1"),
          arch: str = typer.Option("mlp", help="zoo architecture: mlp, cnn, transformer"),
          model: str = typer.Option(..., help="model id the result is registered under"),
          epochs: int = typer.Option(3, min=1),
          hp: list[str] = typer.Option([], "--hp", help="hyperparameter key=value (JSON value), "
                                       "e.g. --hp hidden_sizes=[64,32]"),
          batch_size: int = typer.Option(32, min=1),
          lr: float = typer.Option(0.003, help="learning rate"),
          optimizer: str = typer.Option("adam", help="sgd, momentum, rmsprop, adam, adamw"),
          alias_name: str = typer.Option("", "--alias", help="alias to point at the result"),
          min_test_accuracy: float = typer.Option(0.0, help="register only at this accuracy"),
          wait: bool = typer.Option(True, help="follow the job with a progress bar")):
    """Train a zoo model; the result is registered as a new version of --model.

    e.g. maas train --dataset builtin:digits --arch mlp --epochs 3 --model digits
    """
    hyperparameters = dict(_key_value(item, "--hp") for item in hp)
    job = state(ctx).client().train(dataset=dataset, arch=arch, model=model, epochs=epochs,
                                    hyperparameters=hyperparameters, batch_size=batch_size,
                                    learning_rate=lr, optimizer=optimizer, alias=alias_name,
                                    min_test_accuracy=min_test_accuracy)
    if wait:
        _follow(ctx, job, epochs)
    else:
        state(ctx).output.emit(job, lambda console: console.print(job.name))


def compress(ctx: typer.Context,
             source: str = typer.Argument(None, help="version to compress, e.g. "
                                          "models/digits@production"),
             step: list[str] = typer.Option([], "--step", help="kind[:key=value,...] in order: "
                                            "prune:amount=0.5, quantize:dtype=int8, convert, "
                                            "quantize:dtype=int8,format=torch (int8 kept in "
                                            "torch), distill:epochs=2,student={\"kind\":\"mlp\"}, "
                                            "fuse:model_versions=[\"digits/2\"]"),
             output: str = typer.Option("", help="model id the result is registered under"),
             dataset: str = typer.Option("builtin:digits", help="evaluation dataset "
                                         "(builtin:pydoc for sentence encoders)"),
             alias_name: str = typer.Option("", "--alias", help="alias to point at the result"),
             max_accuracy_drop: float = typer.Option(None, help="gate: reject a larger drop "
                                                     "(points, 0-100)"),
             spec: Path = typer.Option(None, help="a CompressionSpec as a JSON or YAML file "
                                       "(steps may use the short kind:key=value form)"),
             wait: bool = typer.Option(True, help="follow the job with a progress bar")):
    """Compress a version; the result is registered as a new version of --output.

    e.g. maas compress models/digits@production --step prune:amount=0.5
    --step quantize:dtype=int8 --output digits-small; a sentence encoder to int8 in torch:
    maas compress minilm/1 --step quantize:dtype=int8,format=torch --dataset builtin:pydoc
    --output minilm-int8
    """
    client = state(ctx).client()
    if spec is not None:
        job = client.compress("", spec=compression_spec_from_document(_read_document(spec)))
    else:
        if not source or not step:
            raise InvalidArgument("give SOURCE and at least one --step, or --spec FILE",
                                  field_violations=[FieldViolation("steps", "at least one")],
                                  reason="STEPS_MISSING")
        job = client.compress(source, step, dataset=dataset, output=output, alias=alias_name,
                              max_accuracy_drop=max_accuracy_drop)
    if wait:
        _follow(ctx, job, 0)
    else:
        state(ctx).output.emit(job, lambda console: console.print(job.name))


def _job_row(job) -> dict[str, Any]:
    return {"name": job.name, "state": state_name(job.state).lower(),
            "result": job.model_version, "creator": job.creator,
            "error": job.error.message if job.state == job_pb2.JOB_STATE_FAILED else ""}


@jobs.command("list")
def jobs_list(ctx: typer.Context, kind: str = typer.Option("all", help="training, compression "
                                                           "or all")):
    """List training and compression jobs."""
    found = state(ctx).client().list_jobs(kind)
    state(ctx).output.table((_job_row(job) for job in found),
                            ("name", "state", "result", "creator", "error"), data=found)


@jobs.command("get")
def jobs_get(ctx: typer.Context, name: str = typer.Argument(..., help="trainingJobs/… or "
                                                            "compressionJobs/…")):
    """Show a job."""
    state(ctx).output.emit(state(ctx).client().get_job(name))


@jobs.command("cancel")
def jobs_cancel(ctx: typer.Context, name: str):
    """Cancel a queued or running job."""
    job = state(ctx).client().cancel_job(name)
    state(ctx).output.table([_job_row(job)], ("name", "state"), data=job)


# Deployments and predictions --------------------------------------------------------------

def _deployment_row(deployment: deployment_pb2.Deployment) -> dict[str, Any]:
    return {"name": deployment.name, "model": deployment.model,
            "state": deployment_pb2.DeploymentState.Name(deployment.state)
            .removeprefix("DEPLOYMENT_STATE_").lower(),
            "serving": list(deployment.serving_versions),
            "traffic": {t.model_version: f"{t.percent}%" for t in deployment.traffic},
            "shadow": (f"{deployment.shadow.model_version} {deployment.shadow.percent}%"
                       if deployment.shadow.model_version else "")}


_DEPLOYMENT_COLUMNS = ("name", "model", "state", "serving", "traffic", "shadow")


def deploy(ctx: typer.Context, deployment: str = typer.Argument(..., help="deployment id"),
           model: str = typer.Argument(..., help="digits@production or a version"),
           replace: bool = typer.Option(False, help="delete an existing deployment first"),
           track_alias: bool = typer.Option(True, help="follow the alias when it moves"),
           max_batch_size: int = typer.Option(0, help="Triton's max batch (0: the default)")):
    """Serve MODEL on Triton as DEPLOYMENT (ready when this returns)."""
    created = state(ctx).client().deploy(deployment, model, replace=replace,
                                         track_alias=track_alias if "@" in model else False,
                                         max_batch_size=max_batch_size)
    state(ctx).output.table([_deployment_row(created)], _DEPLOYMENT_COLUMNS, data=created)


def rollout(ctx: typer.Context, deployment: str,
            model: str = typer.Argument(..., help="the version (or alias) to move to"),
            canary: int = typer.Option(0, min=0, max=100, help="send only this percent to "
                                       "MODEL, the rest to what serves now"),
            shadow: int = typer.Option(0, min=0, max=100, help="mirror this percent to MODEL "
                                       "instead (answers compared, not returned)")):
    """Move DEPLOYMENT to MODEL: all at once, as a canary split, or as a shadow."""
    client = state(ctx).client()
    if canary and shadow:
        raise InvalidArgument("--canary and --shadow exclude each other",
                              field_violations=[FieldViolation("canary", "or --shadow")],
                              reason="CANARY_AND_SHADOW_EXCLUSIVE")
    if canary:
        current = client.get_deployment(deployment)
        serving = current.serving_versions[0] if current.serving_versions else current.model
        updated = client.split_traffic(deployment, {serving: 100 - canary, model: canary})
    elif shadow:
        updated = client.shadow(deployment, model, shadow)
    else:
        updated = client.rollout(deployment, model)
    state(ctx).output.table([_deployment_row(updated)], _DEPLOYMENT_COLUMNS, data=updated)


@deployments.command("list")
def deployments_list(ctx: typer.Context):
    """List deployments."""
    found = state(ctx).client().list_deployments()
    state(ctx).output.table((_deployment_row(d) for d in found), _DEPLOYMENT_COLUMNS, data=found)


@deployments.command("get")
def deployments_get(ctx: typer.Context, deployment: str):
    """Show a deployment."""
    state(ctx).output.emit(state(ctx).client().get_deployment(deployment))


@deployments.command("delete")
def deployments_delete(ctx: typer.Context, deployment: str):
    """Delete a deployment and unload its models."""
    state(ctx).client().delete_deployment(deployment)
    state(ctx).output.emit({"deleted": deployment})


def predict(ctx: typer.Context, deployment: str,
            inputs: str = typer.Argument(..., metavar="INPUT", help=".npy (one input), .npz "
                                         "(name → array), .json file, or inline JSON: a nested "
                                         'list, or {"name": nested list}'),
            dtype: str = typer.Option("float32", help="numpy dtype of JSON inputs"),
            save: Path = typer.Option(None, "--save", help="write the outputs to this .npz")):
    """Run INPUT through DEPLOYMENT and print the outputs (shape, values, argmax)."""
    arrays = load_inputs(inputs, dtype)
    outputs = state(ctx).client().predict(deployment, arrays)
    if save is not None:
        np.savez(save, **outputs)
    data = {name: {"datatype": str(array.dtype), "shape": list(array.shape),
                   "data": array.tolist()} for name, array in outputs.items()}

    def render(console: Console) -> None:
        for name, array in outputs.items():
            console.print(f"[bold]{name}[/bold] {array.dtype} {list(array.shape)}")
            console.print(np.array2string(array, precision=4, threshold=200))
            if array.ndim == 2:
                console.print(f"argmax: {array.argmax(axis=1).tolist()}")

    state(ctx).output.emit(data, render)


def load_inputs(source: str, dtype: str) -> np.ndarray | dict[str, np.ndarray]:
    """Prediction inputs from a .npy/.npz/.json file or inline JSON; InvalidArgument names
    what is wrong with them."""
    path = Path(source)
    stripped = source.lstrip()
    if stripped.startswith(("[", "{")):
        return _json_inputs(stripped, dtype, "input")
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", source)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    if path.suffix == ".json":
        return _json_inputs(path.read_text(), dtype, path.name)
    raise InvalidArgument.for_field("input", f"{path.name}: expected .npy, .npz or .json")


def _json_inputs(text: str, dtype: str, where: str) -> np.ndarray | dict[str, np.ndarray]:
    try:
        document = json.loads(text)
    except ValueError as error:
        raise InvalidArgument.for_field("input", f"malformed JSON in {where}: {error}") from None
    if isinstance(document, dict):
        return {name: _json_array(value, dtype, f"input.{name}") for name, value in document.items()}
    return _json_array(document, dtype, "input")


def _json_array(value: Any, dtype: str, field_path: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.dtype(dtype))
    except (ValueError, TypeError) as error:
        raise InvalidArgument.for_field(field_path, f"not a rectangular array of numbers: "
                                        f"{error}") from None
    if array.ndim == 0:
        raise InvalidArgument.for_field(field_path, "a tensor needs at least one dimension")
    return array


# Status and tokens --------------------------------------------------------------------------

# Usage --------------------------------------------------------------------------------------

_RELATIVE_TIME = re.compile(r"(\d+)([smhd])")
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime | None:
    """`--since`: a duration back from now (`90s`, `30m`, `2h`, `7d`) or an ISO 8601 time
    (UTC unless it names its offset); "" is no bound."""
    text = text.strip()
    if not text:
        return None
    relative = _RELATIVE_TIME.fullmatch(text)
    if relative:
        seconds = int(relative.group(1)) * _SECONDS_PER_UNIT[relative.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument.for_field(
            "since", f"{text!r} is neither a duration (30m, 2h, 7d) nor an ISO 8601 time",
            reason="TIME_INVALID") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _usage_row(record) -> dict[str, Any]:
    return {"start": record.start_time.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds"),
            "tenant": record.tenant, "deployment": record.deployment.removeprefix("deployments/"),
            "kind": record.kind, "requests": record.requests, "rows": record.rows,
            "tokens": f"{record.prompt_tokens}+{record.completion_tokens}",
            "seconds": record.duration_seconds, "outcome": record.outcome}


def usage(ctx: typer.Context,
          tenant: str = typer.Option("", help="only this tenant's usage"),
          deployment: str = typer.Option("", help="only this deployment's usage"),
          since: str = typer.Option("", help="from this long ago (30m, 2h, 7d) or an ISO time"),
          summary: bool = typer.Option(False, help="sums instead of records"),
          group_by: str = typer.Option("tenant", help="--summary: tenant, deployment, "
                                       "tenant,deployment or '' (one total)"),
          limit: int = typer.Option(100, min=0, help="at most this many records (0: all)")):
    """Usage recorded by the inference service: generations and predictions per tenant."""
    client, start = state(ctx).client(), parse_since(since)
    if summary:
        totals = client.usage_summary(tenant=tenant, deployment=deployment, since=start,
                                      group_by=group_by)
        state(ctx).output.table(
            ({"tenant": t.tenant, "deployment": t.deployment.removeprefix("deployments/"),
              "requests": t.requests, "rows": t.rows, "prompt tokens": t.prompt_tokens,
              "completion tokens": t.completion_tokens} for t in totals),
            ("tenant", "deployment", "requests", "rows", "prompt tokens", "completion tokens"),
            data=totals)
        return
    records = client.usage(tenant=tenant, deployment=deployment, since=start, limit=limit)
    state(ctx).output.table(
        (_usage_row(r) for r in records),
        ("start", "tenant", "deployment", "kind", "requests", "rows", "tokens", "seconds",
         "outcome"), data=records)


def status(ctx: typer.Context):
    """Health of every service and whether Triton is ready; exits 5 unless all are."""
    found = state(ctx).client().status()
    state(ctx).output.table(({"service": s.name, "target": s.target, "status": s.status,
                              "detail": s.detail} for s in found),
                            ("service", "target", "status", "detail"),
                            data=[{"service": s.name, "target": s.target, "status": s.status,
                                   "ok": s.ok, "detail": s.detail} for s in found])
    if not all(s.ok for s in found):
        raise typer.Exit(5)


@token.command("create")
def token_create(ctx: typer.Context, principal: str,
                 role: str = typer.Option("viewer", help="viewer, editor or admin"),
                 model: list[str] = typer.Option([], "--model", help="model id pattern scope "
                                                 "(repeatable)"),
                 tenant: str = typer.Option("", help="whose limits and usage its calls count "
                                            "against (default: PRINCIPAL)")):
    """Mint a token for PRINCIPAL; prints it once (only its hash is stored)."""
    minted = state(ctx).client().create_token(principal, role, model, tenant)
    state(ctx).output.emit({"principal": principal, "role": role, "models": model,
                            "tenant": tenant or principal, "token": minted},
                           lambda console: console.print(minted))


@token.command("list")
def token_list(ctx: typer.Context):
    """List the tokens (principal, role, scopes, sha256 prefix)."""
    found = state(ctx).client().list_tokens()
    rows = [{"principal": t.principal, "role": t.role, "models": list(t.models),
             "tenant": t.tenant or t.principal, "sha256": t.sha256[:12]} for t in found]
    state(ctx).output.table(rows, ("principal", "role", "models", "tenant", "sha256"),
                            data=[{**row, "sha256": t.sha256} for row, t in zip(rows, found,
                                                                                 strict=True)])


@token.command("revoke")
def token_revoke(ctx: typer.Context, which: str = typer.Argument(
        ..., help="a principal (all its tokens) or a sha256 prefix (8+ hex characters)")):
    """Revoke tokens; the services refuse them within a second."""
    revoked = state(ctx).client().revoke_token(which)
    if not revoked:
        fail(f"NOT_FOUND: no token of {which!r}", 4, as_json=state(ctx).json,
             details={"code": "NOT_FOUND", "message": f"no token of {which!r}"})
    state(ctx).output.emit({"revoked": revoked})


# Helpers ------------------------------------------------------------------------------------

def _key_value(text: str, option: str) -> tuple[str, Any]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise InvalidArgument.for_field(option, f"expected key=value, got {text!r}")
    return key.strip(), parse_value(value.strip())


def _read_document(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InvalidArgument.for_field("spec", f"malformed YAML in {path.name}: "
                                            f"{' '.join(str(error).split())}") from None
    else:
        try:
            document = json.loads(text)
        except ValueError as error:
            raise InvalidArgument.for_field("spec", f"malformed JSON in {path.name}: "
                                            f"{error}") from None
    if not isinstance(document, dict):
        raise InvalidArgument.for_field("spec", f"{path.name} must hold an object")
    return document


def _read_json(path: Path, field_path: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except ValueError as error:
        raise InvalidArgument.for_field(field_path, f"malformed JSON in {path.name}: "
                                        f"{error}") from None
    return document


def _load_array(path: Path) -> np.ndarray:
    if path.suffix != ".npy":
        raise InvalidArgument.for_field("example", f"{path.name}: expected a .npy file")
    return np.load(path, allow_pickle=False)


__all__ = ["alias", "compress", "datasets", "deploy", "deployments", "jobs", "lineage",
           "load_inputs", "models", "plain", "predict", "rollout", "status", "token", "train",
           "versions"]
