"""Images built by deploy/images/build.py (`make images`), inspected and run with buildah.

The drill and the image benchmark build through the same module `make images` runs, then look
inside an image (which Python distributions it holds) and run commands in a working container
with chroot isolation: the process shares the host's network, so a service started inside
listens on the host's loopback, and runs as the image's own (non-root) user.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "deploy" / "images" / "build.py"
TORCH_WHEELS = Path("/opt/wheels")
# The distributions the gateway image must not hold: torch and what only Triton's models need.
MODEL_RUNTIME_DISTRIBUTIONS = ("torch", "torchao", "onnxruntime", "nvidia-pytriton",
                               "transformers")
LIST_DISTRIBUTIONS = ("import importlib.metadata as m, json; "
                      "print(json.dumps(sorted({d.metadata['Name'].lower() "
                      "for d in m.distributions()})))")


def image_builder() -> ModuleType:
    """deploy/images/build.py as a module (it is a script, not an installed package)."""
    name = "maas_image_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_images(services: Sequence[str], version: str, revision: str = "",
                 extra_arguments: Sequence[str] = ()) -> None:
    """Build (layers cached) as `make images` does: the debootstrap base, torch from the wheels
    on this machine's disk when they are there; `revision` defaults to git HEAD;
    `extra_arguments` go to build.py as they are (e.g. `--tritonserver nvidia-pytriton`)."""
    command = [sys.executable, str(BUILD_SCRIPT), *services, "--version", version,
               *extra_arguments]
    if revision:
        command += ["--revision", revision]
    if TORCH_WHEELS.is_dir():
        command += ["--torch-wheels", str(TORCH_WHEELS)]
    subprocess.run(command, check=True)


@contextmanager
def working_container(image: str) -> Iterator[str]:
    """A buildah working container of `image`, removed afterwards."""
    buildah = image_builder().buildah
    container = buildah("from", "--pull=false", image).stdout.strip()
    try:
        yield container
    finally:
        buildah("rm", container, check=False)


def run_command(container: str, command: Sequence[str], *, env: dict[str, str] | None = None,
                volumes: Sequence[str] = ()) -> list[str]:
    """The `buildah run` argument list for `command` in `container` (host network)."""
    arguments = ["buildah", "--storage-driver", "vfs", "run", "--isolation", "chroot",
                 "--network", "host"]
    for key, value in (env or {}).items():
        arguments += ["--env", f"{key}={value}"]
    for volume in volumes:
        arguments += ["--volume", volume]
    return [*arguments, container, "--", *command]


def python_distributions(container: str) -> set[str]:
    """Names of the Python distributions the image's interpreter sees."""
    # python3: the service images' venv has it, and so has the Triton image (no venv there).
    result = subprocess.run(run_command(container, ["python3", "-c", LIST_DISTRIBUTIONS]),
                            capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout))


def image_size_mb(image: str) -> float:
    return image_builder().image_size_bytes(image) / 1e6
