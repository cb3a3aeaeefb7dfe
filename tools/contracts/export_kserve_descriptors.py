"""Export the standard KServe-v2 contract (`inference.GRPCInferenceService`) as a descriptor set.

The suite does not copy grpc_service.proto / model_config.proto into protos/ (STYLE.md rule 1):
it uses the Python stubs that ship in tritonclient. Other languages still need the contract,
so this writes a FileDescriptorSet (.binpb) built from those modules' own descriptors — the
files and their transitive imports, imports first — which `protoc --descriptor_set_in=...`,
`buf` or grpc-js proto-loader (`loadFileDescriptorSetFromBuffer`) generate or load from.
The export therefore always matches the tritonclient version installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

# grpc_service.proto holds the service and imports model_config.proto; naming both keeps the
# export complete even if a future release stops importing one from the other.
KSERVE_MODULES = ("tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2")
KSERVE_SERVICE = "inference.GRPCInferenceService"


def file_descriptor_set(files: list[FileDescriptor]) -> descriptor_pb2.FileDescriptorSet:
    """The given files and everything they import, each once, every import before its user."""
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        ordered.append(file)

    for file in files:
        visit(file)
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    for file in ordered:
        file.CopyToProto(descriptor_set.file.add())
    return descriptor_set


def kserve_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    files = [importlib.import_module(name).DESCRIPTOR for name in KSERVE_MODULES]
    return file_descriptor_set(files)


def export(out: Path) -> descriptor_pb2.FileDescriptorSet:
    descriptor_set = kserve_descriptor_set()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(descriptor_set.SerializeToString(deterministic=True))
    return descriptor_set


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .binpb file to write")
    args = parser.parse_args()
    descriptor_set = export(args.out)
    names = ", ".join(file.name for file in descriptor_set.file)
    print(f"wrote {args.out}: {KSERVE_SERVICE} in {len(descriptor_set.file)} files ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
