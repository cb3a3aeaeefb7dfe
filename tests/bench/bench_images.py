"""Image benchmark: the size of every image, torch in it or not, and references.

Builds the four service images and the Triton image as `make images` does (layers cached: an
unchanged image is reused) and prints one table. The Triton image derives from NGC's
tritonserver where that base can be had, else (here) from the nvidia-pytriton substitute on the
services' base; the table says which. References measured in the same run: the base image the services derive
from (the debootstrap bookworm root with Python 3.11), and each service's builder stage alone
(the image one would ship by stopping there; the inference data plane's C++ toolchain lives in
a stage of its own, so its builder holds the stripped venv only). Goal: the inference image
under 400 MB with no torch.

Run: `make bench` (or `.venv/bin/python -m tests.bench.bench_images [image ...]`); `make
images` first saves the build time here.
"""

from __future__ import annotations

import sys
import time

from tests.support.images import (
    TORCH_WHEELS,
    image_builder,
    image_size_mb,
    python_distributions,
    working_container,
)

VERSION = "bench"
INFERENCE_GOAL_MB = 400
TORCH = {"torch", "torchao"}


def main() -> None:
    builder = image_builder()
    # Services named on the command line, else every one.
    services = tuple(sys.argv[1:]) or (*builder.SERVICES, builder.TRITON)
    started = time.monotonic()
    tritonserver = (builder.TRITONSERVER_FROM_BASE
                    if builder.TRITON in services
                    and not builder.triton_base_available(builder.DEFAULT_TRITON_BASE)
                    else builder.TRITONSERVER_FROM_WHEEL)
    options = builder.BuildOptions(
        base=builder.ensure_local_base(), version=VERSION, revision=builder.git_revision(),
        torch_wheels=TORCH_WHEELS if TORCH_WHEELS.is_dir() else None,
        tritonserver=tritonserver, ca_bundle=builder.default_ca_bundle())
    # Each final image, then its builder stage alone, whose
    # layers the first build cached.
    naive = {}
    for service in services:
        builder.build_image(service, options)
        naive[service] = image_size_mb(builder.build_image(service, options, "builder"))
    build_seconds = time.monotonic() - started
    base_mb = image_size_mb(builder.LOCAL_BASE)

    header = ("image", "size MB", "vs base", "builder stage MB", "ratio", "torch", "goal")
    rows = [("base (bookworm + python3.11)", f"{base_mb:.0f}", "1.00", "-", "-", "no", "-")]
    for service in services:
        image = builder.image_name(service, options)
        size = image_size_mb(image)
        with working_container(image) as container:
            has_torch = bool(python_distributions(container) & TORCH)
        goal = (f"< {INFERENCE_GOAL_MB} MB, no torch: "
                f"{'met' if size < INFERENCE_GOAL_MB and not has_torch else 'MISSED'}"
                if service == "inference" else "CPU torch" if service in ("trainer",
                                                                          "compressor") else "-")
        name = service
        if service == builder.TRITON:
            goal = "CPU torch, Python backend"
            name = (f"triton ({builder.DEFAULT_TRITON_BASE})"
                    if tritonserver == builder.TRITONSERVER_FROM_BASE
                    else "triton (nvidia-pytriton substitute)")
        rows.append((name, f"{size:.0f}", f"{size / base_mb:.2f}", f"{naive[service]:.0f}",
                     f"{size / naive[service]:.2f}", "yes" if has_torch else "no", goal))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    print()
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"(builds and inspection: {build_seconds:.0f} s; sizes uncompressed, as buildah "
          f"reports them; ratio = final image / builder stage)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
