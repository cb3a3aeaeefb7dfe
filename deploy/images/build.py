"""Build the suite's container images with buildah, without a Docker daemon (`make images`).

Each service has a Containerfile here (multi-stage, non-root, only its own packages). The base
image is a build argument: real CI passes `python:3.11-slim` (`--base python:3.11-slim`); where no
image registry is reachable, the default makes one from Debian: `debootstrap --variant=minbase
bookworm`, Python 3.11 with venv and CA certificates added, imported into buildah as
`localhost/maas-base:bookworm`. Root and image are made once and reused.

torch comes from a build argument as well: the CPU index (download.pytorch.org) by default, a
directory of wheels bind-mounted into the build with `--torch-wheels DIR` (this machine keeps the
CPU wheel on disk), or a CUDA index with `--torch-index-url`.

The Triton image takes its tritonserver from its base by default (`--triton-base`, an NGC
tritonserver image), and builds only when that base is in local storage or can be pulled;
otherwise it is skipped with a message naming the missing base. `--tritonserver nvidia-pytriton`
builds it instead on the service images' base with the tritonserver of the `nvidia-pytriton`
wheel (Python backend only), the substitute where NGC cannot be reached (`make images` here).

Every buildah call uses vfs storage and chroot isolation, which work unprivileged in containers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO / "deploy" / "images"
SERVICES = ("registry", "trainer", "compressor", "inference")
TRITON = "triton"
LOCAL_BASE = "localhost/maas-base:bookworm"
DEFAULT_ROOTFS = REPO / "build" / "images" / "bookworm-rootfs"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Python with venv (ensurepip) for the builder stages, CA certificates for pip over HTTPS.
BASE_PACKAGES = ("python3.11", "python3.11-venv", "ca-certificates")
APT_CLEAN_CONFIG = (
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
    'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n')
DEFAULT_TRITON_BASE = "nvcr.io/nvidia/tritonserver:25.01-py3"
# Where the Triton image's tritonserver comes from: its (NGC) base, or the nvidia-pytriton wheel
# on the service images' base (triton.Containerfile's TRITONSERVER argument).
TRITONSERVER_FROM_BASE = "base"
TRITONSERVER_FROM_WHEEL = "nvidia-pytriton"
DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
DEFAULT_SOURCE = "https://github.com/maas-suite/maas"
TORCH_WHEELS_MOUNT = "/mnt/torch-wheels"
CA_BUNDLE_MOUNT = "/mnt/ca-bundle.crt"
# What a minbase root does not need in an image: package caches and lists, documentation.
TRIMMED_PATHS = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                 "usr/share/info", "usr/share/locale", "debootstrap")


class ImageBuildError(RuntimeError):
    """A step of an image build failed; the message names the step and its output."""


def buildah(*args: str, capture: bool = True, check: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run buildah with the storage and isolation every build here uses."""
    command = ["buildah", "--storage-driver", "vfs", *args]
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
    result = subprocess.run(command, capture_output=capture, text=True, env=env,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise ImageBuildError(f"{' '.join(command)} failed ({result.returncode}): "
                              f"{(result.stderr or '').strip()[-2000:]}")
    return result


def image_exists(name: str) -> bool:
    return buildah("inspect", "--type", "image", name, check=False).returncode == 0


_SIZE_UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def image_size_bytes(name: str) -> int:
    """Uncompressed size of an image in local storage (the sum of its layers), as buildah
    reports it (decimal units, three significant digits, e.g. "128 MB")."""
    for image in json.loads(buildah("images", "--json", name).stdout or "[]"):
        number, unit = str(image["size"]).split()
        return round(float(number) * _SIZE_UNITS[unit])
    raise ImageBuildError(f"no image {name} in local storage")


def image_labels(name: str) -> dict[str, str]:
    config = json.loads(buildah("inspect", "--type", "image", name).stdout)
    return dict(config.get("OCIv1", {}).get("config", {}).get("Labels") or {})


def make_debian_root(rootfs: Path, mirror: str = DEBIAN_MIRROR) -> None:
    """A Debian bookworm minbase root with Python 3.11, made once (a stamp marks it complete)."""
    stamp = rootfs.parent / (rootfs.name + ".complete")
    if stamp.exists():
        return
    if rootfs.exists():
        shutil.rmtree(rootfs)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], "debootstrap")
    # apt inside the root resolves dependencies that debootstrap's --include does not.
    apt = ["chroot", str(rootfs), "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    _run([*apt, "update", "-qq"], "apt-get update in the root")
    _run([*apt, "install", "-y", "-qq", "--no-install-recommends", *BASE_PACKAGES],
         "apt-get install in the root")
    _run([*apt, "clean"], "apt-get clean in the root")
    for relative in TRIMMED_PATHS:
        target = rootfs / relative
        if target.is_dir():
            shutil.rmtree(target)
            if relative.startswith("var/"):
                target.mkdir(parents=True)
    # As Debian's own container images do: apt drops downloaded packages and its binary caches
    # after every install, so no image layer keeps them.
    (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN_CONFIG)
    # apt needs these to exist in the derived images' builder stages.
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    stamp.touch()


def import_base(rootfs: Path, name: str = LOCAL_BASE) -> None:
    """Commit `rootfs` as the image `name` (buildah from scratch, copy, commit), once."""
    if image_exists(name):
        return
    container = buildah("from", "scratch").stdout.strip()
    try:
        mountpoint = Path(buildah("mount", container).stdout.strip())
        _run(["cp", "-a", f"{rootfs}/.", f"{mountpoint}/"], "copying the root into the image")
        buildah("umount", container)
        buildah("config", "--env", "LANG=C.UTF-8",
                "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd", "python3.11", "--label",
                "org.opencontainers.image.description=Debian bookworm minbase with Python 3.11",
                container)
        buildah("commit", "--rm", container, name)
    except BaseException:
        buildah("rm", container, check=False)
        raise


def ensure_local_base(rootfs: Path = DEFAULT_ROOTFS) -> str:
    """The debootstrap base image, made if absent; returns its name."""
    if not image_exists(LOCAL_BASE):
        make_debian_root(rootfs)
        import_base(rootfs)
    return LOCAL_BASE


@dataclass(frozen=True)
class BuildOptions:
    """What every image build shares: base, labels, the torch source."""

    base: str
    version: str
    revision: str
    source: str = DEFAULT_SOURCE
    torch_index_url: str = DEFAULT_TORCH_INDEX
    torch_wheels: Path | None = None
    triton_base: str = DEFAULT_TRITON_BASE
    tritonserver: str = TRITONSERVER_FROM_BASE
    """`base`: the tritonserver of `triton_base`; `nvidia-pytriton`: the wheel's, on `base`."""
    ca_bundle: Path | None = None
    """CA bundle pip trusts inside the build (where HTTPS goes through an intercepting proxy)."""
    tag_prefix: str = "localhost/maas-"


def image_name(service: str, options: BuildOptions, target: str = "") -> str:
    suffix = f"-{target}" if target else ""
    return f"{options.tag_prefix}{service}{suffix}:{options.version}"


def build_image(service: str, options: BuildOptions, target: str = "") -> str:
    """`buildah bud` of deploy/images/<service>.Containerfile with the repository as context;
    layers are cached, so an unchanged service rebuilds in seconds. `target` stops at a stage
    (e.g. "builder": the single-stage image one would get without the final stage). Returns
    the image name."""
    name = image_name(service, options, target)
    args = ["bud", "--layers", "--isolation", "chroot", "--format", "oci",
            *(["--target", target] if target else []),
            "-f", str(IMAGES_DIR / f"{service}.Containerfile"), "-t", name,
            "--build-arg", f"VERSION={options.version}",
            "--build-arg", f"REVISION={options.revision}",
            "--build-arg", f"SOURCE={options.source}",
            # Also as labels of the commit: buildah reuses a cached LABEL step whatever the
            # arguments' values, which would leave an earlier revision on the image.
            "--label", f"org.opencontainers.image.version={options.version}",
            "--label", f"org.opencontainers.image.revision={options.revision}",
            "--label", f"org.opencontainers.image.source={options.source}"]
    if service == TRITON and options.tritonserver == TRITONSERVER_FROM_BASE:
        args += ["--build-arg", f"BASE={options.triton_base}"]
    elif service == TRITON:
        args += ["--build-arg", f"BASE={options.base}",
                 "--build-arg", f"TRITONSERVER={options.tritonserver}"]
    else:
        args += ["--build-arg", f"BASE={options.base}"]
    if service in ("trainer", "compressor", TRITON):
        if options.torch_wheels is not None:
            # The wheels alone: an index that cannot be reached would only cost retries.
            args += ["--volume", f"{options.torch_wheels}:{TORCH_WHEELS_MOUNT}:ro",
                     "--build-arg", f"TORCH_FIND_LINKS={TORCH_WHEELS_MOUNT}",
                     "--build-arg", "TORCH_INDEX_URL="]
        else:
            args += ["--build-arg", f"TORCH_INDEX_URL={options.torch_index_url}"]
    if options.ca_bundle is not None:
        args += ["--volume", f"{options.ca_bundle}:{CA_BUNDLE_MOUNT}:ro",
                 "--build-arg", f"PIP_CERT={CA_BUNDLE_MOUNT}"]
    result = buildah(*args, str(REPO), capture=False, check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"building {name} from {service}.Containerfile failed "
                              f"(buildah exit {result.returncode}; its output is above)")
    return name


def triton_base_available(base: str, pull_timeout_seconds: float = 60.0) -> str:
    """Empty when `base` is in local storage or could be pulled; else why not."""
    if image_exists(base):
        return ""
    try:
        pulled = buildah("pull", "--quiet", base, check=False, timeout=pull_timeout_seconds)
    except subprocess.TimeoutExpired:
        return f"pulling {base} timed out after {pull_timeout_seconds:.0f} s"
    if pulled.returncode == 0:
        return ""
    reason = (pulled.stderr or "").strip().splitlines()
    return f"cannot pull {base}: {reason[-1] if reason else 'no output'}"


def git_revision() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def default_ca_bundle() -> Path | None:
    """The CA bundle the host's pip uses, if one is configured: builds reach PyPI the same way."""
    configured = os.environ.get("PIP_CERT", "")
    return Path(configured) if configured and Path(configured).is_file() else None


def _run(command: list[str], step: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"{step} failed ({result.returncode}): "
                              f"{(result.stdout + result.stderr).strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("services", nargs="*", default=[*SERVICES, TRITON],
                        choices=[*SERVICES, TRITON], help="images to build (default: all)")
    parser.add_argument("--base", default="",
                        help="base image, e.g. python:3.11-slim; default: the debootstrap one")
    parser.add_argument("--target", default="",
                        help="stop at this stage (tagged <service>-<target>), e.g. builder")
    parser.add_argument("--rootfs", type=Path, default=DEFAULT_ROOTFS,
                        help="where the debootstrap root is made and kept")
    parser.add_argument("--version", default="dev", help="image tag and version label")
    parser.add_argument("--revision", default="", help="revision label (default: git HEAD)")
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="source label")
    parser.add_argument("--torch-index-url", default=DEFAULT_TORCH_INDEX,
                        help="pip index of torch (CPU by default; a CUDA index for GPU images)")
    parser.add_argument("--torch-wheels", type=Path, default=None,
                        help="directory of torch wheels mounted into the build instead")
    parser.add_argument("--ca-bundle", type=Path, default=default_ca_bundle(),
                        help="CA bundle for pip in the build (default: $PIP_CERT if set)")
    parser.add_argument("--triton-base", default=DEFAULT_TRITON_BASE,
                        help="NGC tritonserver image the Triton image derives from")
    parser.add_argument("--tritonserver", default=TRITONSERVER_FROM_BASE,
                        choices=[TRITONSERVER_FROM_BASE, TRITONSERVER_FROM_WHEEL],
                        help="tritonserver of the Triton image: its --triton-base's, or the "
                             "nvidia-pytriton wheel's on --base (where NGC is unreachable)")
    args = parser.parse_args(argv)
    options = BuildOptions(
        base=args.base or ensure_local_base(args.rootfs), version=args.version,
        revision=args.revision or git_revision(), source=args.source,
        torch_index_url=args.torch_index_url, torch_wheels=args.torch_wheels,
        triton_base=args.triton_base, tritonserver=args.tritonserver,
        ca_bundle=args.ca_bundle)
    built: list[tuple[str, str, float]] = []
    for service in args.services:
        if service == TRITON and options.tritonserver == TRITONSERVER_FROM_BASE:
            missing = triton_base_available(options.triton_base)
            if missing:
                print(f"SKIPPED the Triton image: its base is not available here ({missing}). "
                      f"Build it where {options.triton_base} can be pulled, pass "
                      f"--triton-base with an image in local storage, or --tritonserver "
                      f"{TRITONSERVER_FROM_WHEEL} for the nvidia-pytriton substitute.",
                      flush=True)
                continue
        started = time.monotonic()
        name = build_image(service, options, args.target)
        built.append((service, name, time.monotonic() - started))
    for service, name, seconds in built:
        print(f"{service:<11} {name:<40} {image_size_bytes(name) / 1e6:8.1f} MB "
              f"built in {seconds:6.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ImageBuildError as error:
        print(f"make images: {error}", file=sys.stderr)
        sys.exit(1)
