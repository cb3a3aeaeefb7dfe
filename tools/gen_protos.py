"""Generate the Python stubs of the MaaS contracts into libs/maas-api, or check they are current.

`--check` regenerates into a temporary directory and fails when anything differs from what is
committed, so a proto edit without regenerated stubs cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) over every contract, writing packages under out_dir."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in proto_files():
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    # Package markers so the generated tree imports as maas.<service>.v1 (maas/ stays a
    # namespace package shared with nothing else).
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")}:
        directory = package_dir
        while directory != out_dir / "maas":
            (directory / "__init__.py").touch()
            directory = directory.parent


def generated_files(root: Path) -> set[Path]:
    maas_root = root / "maas"
    if not maas_root.exists():
        return set()
    return {
        p.relative_to(root)
        for p in maas_root.rglob("*")
        if p.is_file() and (p.name.endswith(GENERATED_SUFFIXES) or p.name == "__init__.py")
    }


def check(out_dir: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected, actual = generated_files(fresh), generated_files(out_dir)
        problems = [f"missing: {p}" for p in sorted(expected - actual)]
        problems += [f"stale (no proto): {p}" for p in sorted(actual - expected)]
        problems += [
            f"differs: {p}"
            for p in sorted(expected & actual)
            if not filecmp.cmp(fresh / p, out_dir / p, shallow=False)
        ]
    if problems:
        print("generated stubs are out of date; run `make proto`:", *problems, sep="\n  ")
        return 1
    print(f"generated stubs are current ({len(expected)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="source root of maas-api")
    parser.add_argument("--check", action="store_true", help="fail when stubs are stale")
    args = parser.parse_args()
    out_dir = args.out.resolve()
    if args.check:
        return check(out_dir)
    for stale in generated_files(out_dir):
        (out_dir / stale).unlink()
    generate(out_dir)
    print(f"generated {len(generated_files(out_dir))} files into {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
