"""`make clients`: one self-contained bundle of the contracts, with stubs for Node, Go, Java, C++.

Layout of the bundle (default build/clients/), every .proto at its import path so that
`protoc -I build/clients` (and nothing else) compiles each of them:

    maas/...                         the suite's contracts (protos/)
    google/rpc/{status,error_details,code}.proto
                                     the error model, from the googleapis-common-protos package
    google/protobuf/*.proto          the well-known types the above import, from grpcio-tools
    grpc_service.proto, model_config.proto, kserve.binpb
                                     KServe-v2 (`inference.GRPCInferenceService`), exported from
                                     tritonclient's stubs as .proto source and descriptor set
    node/maas_clients.js, node/types/
                                     a grpc-js loader module and TypeScript types
                                     (proto-loader-gen-types from tools/node_modules)
    go/      protoc-gen-go + protoc-gen-go-grpc (Debian protoc-gen-go, protoc-gen-go-grpc)
    java/    --java_out + grpc_java_plugin (Debian protobuf-compiler-grpc-java-plugin)
    cpp/     --cpp_out + grpc_cpp_plugin (Debian protobuf-compiler-grpc)

Every generator runs the system protoc through `cross_language.protoc_command`, with the bundle
as its only include path. Nothing is downloaded: a generator whose tool is missing is skipped and
named in the summary (and `--require-all` turns that into a failure).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import google.rpc
import grpc_tools
from cross_language import REPO, CompileError, proto_files, protoc_command, run
from export_kserve_descriptors import export, write_proto_sources

DEFAULT_OUT = REPO / "build" / "clients"
NODE_MODULES = REPO / "tools" / "node_modules"
TEMPLATES = Path(__file__).resolve().parent / "clients"
GOOGLE_RPC = ("status.proto", "error_details.proto", "code.proto")
KSERVE_FILES = ("grpc_service.proto", "model_config.proto")
GO_MODULE = "maas.dev/clients/go"
IMPORT = re.compile(r'^import\s+(?:public\s+|weak\s+)?"([^"]+)";', re.MULTILINE)
# The proto-loader options of node/maas_clients.js, so the types describe what it returns.
NODE_TYPE_OPTIONS = ("--keepCase", "--longs=String", "--enums=String", "--defaults", "--oneofs")


def copy_protos(out: Path) -> None:
    """Our protos, google/rpc and the well-known types they import, KServe-v2 as .proto."""
    shutil.copytree(REPO / "protos" / "maas", out / "maas")
    rpc_dir = Path(google.rpc.__path__[0])
    (out / "google" / "rpc").mkdir(parents=True)
    for name in GOOGLE_RPC:
        shutil.copyfile(rpc_dir / name, out / "google" / "rpc" / name)
    write_proto_sources(export(out / "kserve.binpb"), out)
    copy_well_known_imports(out, Path(grpc_tools.__file__).parent / "_proto")


def copy_well_known_imports(out: Path, well_known: Path) -> None:
    """Copy every imported file the bundle lacks from well_known, until nothing is missing
    (well-known types import each other)."""
    while missing := unresolved_imports(out):
        for name in sorted(missing):
            if not (well_known / name).is_file():
                raise CompileError(f"{name} is imported but neither in the bundle nor in "
                                   f"{well_known}")
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(well_known / name, out / name)


def unresolved_imports(root: Path) -> set[str]:
    imported = {name for path in root.rglob("*.proto") for name in IMPORT.findall(path.read_text())}
    return {name for name in imported if not (root / name).is_file()}


def go_package(proto: str) -> str:
    """Go import path of a bundle file: maas/registry/v1/x.proto -> .../maas/registry/v1;registryv1."""
    directory = str(Path(proto).parent)
    if directory == ".":  # KServe-v2: package inference, at the bundle's root
        return f"{GO_MODULE}/inference;inference"
    parts = Path(directory).parts
    return f"{GO_MODULE}/{directory};{parts[-2]}{parts[-1]}"


def generate_stubs(out: Path, protoc: str, node_types: bool = True) -> tuple[list[str], list[str]]:
    """Run every generator whose tools are installed; return (generated, skipped with why)."""
    protos = proto_files(out)
    ours = [p for p in protos if p.startswith("maas/") or p in KSERVE_FILES]
    rpc = [p for p in protos if p.startswith("google/rpc/")]
    generated, skipped = [], []

    def plugin(name: str, package: str) -> str | None:
        path = shutil.which(name)
        if path is None:
            skipped.append(f"{name} not installed (apt-get install {package})")
        return path

    if cpp_plugin := plugin("grpc_cpp_plugin", "protobuf-compiler-grpc"):
        run(protoc_command(protoc, [out], ours + rpc, {"cpp": out / "cpp", "grpc": out / "cpp"},
                           {"grpc": cpp_plugin}), "protoc C++")
        generated.append("cpp")
    if java_plugin := plugin("grpc_java_plugin", "protobuf-compiler-grpc-java-plugin"):
        run(protoc_command(protoc, [out], ours + rpc,
                           {"java": out / "java", "grpc-java": out / "java"},
                           {"grpc-java": java_plugin}), "protoc Java")
        generated.append("java")
    go_plugin = plugin("protoc-gen-go", "protoc-gen-go")
    go_grpc_plugin = plugin("protoc-gen-go-grpc", "protoc-gen-go-grpc")
    if go_plugin and go_grpc_plugin:
        # google/rpc stays out: Go code takes it from google.golang.org/genproto, which is
        # what its go_package names. Ours get their import path here, not in the contracts.
        mappings = [f"M{p}={go_package(p)}" for p in ours] + [f"module={GO_MODULE}"]
        run(protoc_command(protoc, [out], ours, {"go": out / "go", "go-grpc": out / "go"},
                           {"go": go_plugin, "go-grpc": go_grpc_plugin},
                           {"go": mappings, "go-grpc": mappings}), "protoc Go")
        (out / "go" / "go.mod").write_text(f"module {GO_MODULE}\n\ngo 1.19\n")
        generated.append("go")
    node_dir = out / "node"
    node_dir.mkdir(exist_ok=True)
    shutil.copyfile(TEMPLATES / "maas_clients.js", node_dir / "maas_clients.js")
    generated.append("node loader")
    gen_types = NODE_MODULES / ".bin" / "proto-loader-gen-types"
    if node_types and gen_types.exists():
        services = [p for p in ours if p.endswith("_service.proto")] + ["grpc_service.proto"]
        run([str(gen_types), "--grpcLib=@grpc/grpc-js", *NODE_TYPE_OPTIONS,
             f"--includeDirs={out}", f"--outDir={node_dir / 'types'}", *services, *rpc],
            "proto-loader-gen-types")
        generated.append("node types")
    elif node_types:
        skipped.append(f"{gen_types} missing (make install)")
    return generated, skipped


def build(out: Path = DEFAULT_OUT, protoc: str = "protoc", node_types: bool = True
          ) -> tuple[list[str], list[str]]:
    """Write the bundle into out (replaced); return (generated, skipped) stub kinds."""
    protoc_path = shutil.which(protoc)
    if protoc_path is None:
        raise CompileError(f"{protoc} not found (apt-get install protobuf-compiler)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    copy_protos(out)
    generated, skipped = generate_stubs(out, protoc_path, node_types)
    shutil.copyfile(TEMPLATES / "README.md", out / "README.md")
    return generated, skipped


def file_count(root: Path, patterns: Iterable[str]) -> int:
    return sum(1 for pattern in patterns for _ in root.rglob(pattern))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--protoc", default="protoc", help="system protoc (matches the plugins)")
    parser.add_argument("--require-all", action="store_true",
                        help="fail when a generator's tool is missing instead of skipping it")
    args = parser.parse_args()
    try:
        generated, skipped = build(args.out, args.protoc)
    except (CompileError, subprocess.CalledProcessError) as error:
        print(error, file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {file_count(args.out, ['*.proto'])} .proto files; "
          f"stubs: {', '.join(generated)}")
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    return 1 if skipped and args.require_all else 0


if __name__ == "__main__":
    sys.exit(main())
