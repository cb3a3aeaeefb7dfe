"""Prove the contracts generate and compile for C++ and Java, not only for Python.

Runs the system protoc (Debian's protobuf-compiler) with its built-in --cpp_out and --java_out
over every .proto under protos/, then compiles the result against the runtime of the same
version: each .pb.cc with `g++ -std=c++17 -fsyntax-only` and the headers of libprotobuf-dev,
and all .java files with `javac` against libprotobuf-java's jar. Generated code only compiles
against the runtime of the protoc that made it, so protoc, headers and jar must all come from
the same packages (`apt-get install protobuf-compiler libprotobuf-dev libprotobuf-java`).

Well-known imports (google/protobuf/*.proto, descriptor.proto for the custom method option)
resolve from the include directory next to protoc (/usr/include for /usr/bin/protoc).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
DEFAULT_PROTOBUF_JAR = Path("/usr/share/java/protobuf.jar")
INSTALL_HINT = "apt-get install protobuf-compiler libprotobuf-dev libprotobuf-java"


class CompileError(RuntimeError):
    """A generation or compile step failed; the message holds the tool's output."""


def run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        # The first lines name the problem; thousands of follow-on errors don't help.
        head = "\n".join(output.splitlines()[:40])
        raise CompileError(f"{what} failed ({shlex.join(cmd[:3])} ...):\n{head}")


def run_output(cmd: list[str], what: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CompileError(f"{what} failed: {result.stderr.strip()}; {INSTALL_HINT}")
    return result.stdout.strip()


def protobuf_cflags() -> list[str]:
    return shlex.split(run_output(["pkg-config", "--cflags", "protobuf"], "pkg-config"))


def version_numbers(text: str) -> tuple[int, ...]:
    """(3, 21, 12) of "libprotoc 3.21.12"; trailing zeros dropped so 29.3 equals 29.3.0."""
    numbers = [int(part) for part in text.split()[-1].split(".") if part.isdigit()]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def matching_versions(protoc: str) -> str:
    """protoc's version, after checking the C++ headers are of the same release."""
    protoc_version = run_output([protoc, "--version"], "protoc --version")
    headers_version = run_output(["pkg-config", "--modversion", "protobuf"], "pkg-config")
    if version_numbers(protoc_version) != version_numbers(headers_version):
        raise CompileError(
            f"{protoc} is {protoc_version} but the protobuf headers are {headers_version}; "
            "generated code only compiles against its own release: use the system protoc"
        )
    return protoc_version


def protoc_command(
    protoc: str,
    includes: Sequence[Path],
    protos: Sequence[str],
    outputs: Mapping[str, Path],
    plugins: Mapping[str, str] = {},
    options: Mapping[str, Sequence[str]] = {},
) -> list[str]:
    """One protoc invocation: outputs maps a generator ("cpp", "grpc-java", ...) to its
    directory (created here), plugins a generator to its executable, options a generator to
    its `--<generator>_opt` values. Shared by this check and `make clients`."""
    command = [protoc, *(f"-I{include}" for include in includes)]
    for generator, executable in plugins.items():
        command.append(f"--plugin=protoc-gen-{generator}={executable}")
    for generator, out in outputs.items():
        out.mkdir(parents=True, exist_ok=True)
        command.append(f"--{generator}_out={out}")
        command += [f"--{generator}_opt={option}" for option in options.get(generator, ())]
    return [*command, *protos]


def proto_files(proto_root: Path) -> list[str]:
    """Every .proto under proto_root, as the import path protoc takes."""
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    if not protos:
        raise CompileError(f"no .proto files under {proto_root}")
    return protos


def generate(protoc: str, proto_root: Path, include: Path, cpp_out: Path, java_out: Path) -> None:
    outputs = {"cpp": cpp_out, "java": java_out}
    run(protoc_command(protoc, [proto_root, include], proto_files(proto_root), outputs), "protoc")


def compile_cpp(cpp_out: Path, jobs: int) -> int:
    sources = sorted(cpp_out.rglob("*.pb.cc"))
    if not sources:
        raise CompileError(f"protoc wrote no .pb.cc files into {cpp_out}")
    cflags = protobuf_cflags()

    def compile_one(source: Path) -> None:
        run(
            ["g++", "-std=c++17", "-fsyntax-only", f"-I{cpp_out}", *cflags, str(source)],
            f"g++ {source.relative_to(cpp_out)}",
        )

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        # list() re-raises the first CompileError of any worker.
        list(pool.map(compile_one, sources))
    return len(sources)


def compile_java(java_out: Path, classes_out: Path, protobuf_jar: Path) -> int:
    sources = sorted(str(p) for p in java_out.rglob("*.java"))
    if not sources:
        raise CompileError(f"protoc wrote no .java files into {java_out}")
    if not protobuf_jar.exists():
        raise CompileError(f"{protobuf_jar} missing; {INSTALL_HINT}")
    classes_out.mkdir(parents=True, exist_ok=True)
    run(
        [
            "javac",
            "-nowarn",
            "-encoding",
            "UTF-8",
            "-cp",
            str(protobuf_jar),
            "-d",
            str(classes_out),
            *sources,
        ],
        "javac",
    )
    return len(sources)


def check(
    work_dir: Path,
    protoc: str = "protoc",
    proto_root: Path = PROTO_ROOT,
    include: Path | None = None,
    protobuf_jar: Path = DEFAULT_PROTOBUF_JAR,
    jobs: int = 2,
) -> str:
    """Generate into work_dir and compile; return a summary or raise CompileError."""
    protoc_path = shutil.which(protoc)
    if protoc_path is None:
        raise CompileError(f"{protoc} not found; {INSTALL_HINT}")
    version = matching_versions(protoc_path)
    if include is None:
        include = Path(protoc_path).resolve().parent.parent / "include"
    cpp_out, java_out = work_dir / "cpp", work_dir / "java"
    generate(protoc_path, proto_root, include, cpp_out, java_out)
    # javac runs alongside the C++ compiles: it is one process for all files.
    with ThreadPoolExecutor(max_workers=1) as java_pool:
        java_done = java_pool.submit(compile_java, java_out, work_dir / "classes", protobuf_jar)
        cpp_count = compile_cpp(cpp_out, jobs)
        java_count = java_done.result()
    return (
        f"{version}: {cpp_count} C++ sources and {java_count} Java sources generated and compiled"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protoc", default="protoc", help="protoc executable (system one)")
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT)
    parser.add_argument(
        "--include", type=Path, help="well-known types; default: include/ next to protoc"
    )
    parser.add_argument("--protobuf-jar", type=Path, default=DEFAULT_PROTOBUF_JAR)
    parser.add_argument("--jobs", type=int, default=2, help="parallel g++ processes")
    parser.add_argument("--work-dir", type=Path, help="keep generated code here (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maas-contracts-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        try:
            summary = check(
                work_dir, args.protoc, args.proto_root, args.include, args.protobuf_jar, args.jobs
            )
        except CompileError as error:
            print(error, file=sys.stderr)
            return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
