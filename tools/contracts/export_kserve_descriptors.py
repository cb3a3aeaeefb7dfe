"""Export the standard KServe-v2 contract (`inference.GRPCInferenceService`) as a descriptor set.

The suite does not copy grpc_service.proto / model_config.proto into protos/ (STYLE.md rule 1):
it uses the Python stubs that ship in tritonclient. Other languages still need the contract,
so this writes a FileDescriptorSet (.binpb) built from those modules' own descriptors — the
files and their transitive imports, imports first — which `protoc --descriptor_set_in=...`,
`buf` or grpc-js proto-loader (`loadFileDescriptorSetFromBuffer`) generate or load from.
The export therefore always matches the tritonclient version installed.

`--proto-dir` also writes each file back as .proto source (`proto_source`): what Node, Go and
Java users load or generate from. The stubs keep no comments, so neither does the source; a
test compiles the source again and compares the descriptors field by field.
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


_SCALARS = {
    getattr(descriptor_pb2.FieldDescriptorProto, f"TYPE_{name.upper()}"): name
    for name in ("double", "float", "int64", "uint64", "int32", "fixed64", "fixed32", "bool",
                 "string", "bytes", "uint32", "sfixed32", "sfixed64", "sint32", "sint64")
}
_LABEL = descriptor_pb2.FieldDescriptorProto


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    # Fully qualified (".inference.ModelConfig") stays valid wherever the field is declared.
    return _SCALARS.get(field.type) or field.type_name


def _reserved(container, indent: str) -> list[str]:
    ranges = [f"{r.start}" if r.end - r.start == 1 else f"{r.start} to {r.end - 1}"
              for r in container.reserved_range]
    lines = [f"{indent}reserved {', '.join(ranges)};"] if ranges else []
    if container.reserved_name:
        lines.append(f"{indent}reserved {', '.join(repr(n) for n in container.reserved_name)};"
                     .replace("'", '"'))
    return lines


def _enum_lines(enum: descriptor_pb2.EnumDescriptorProto, indent: str) -> list[str]:
    lines = [f"{indent}enum {enum.name} {{"]
    if enum.options.allow_alias:
        lines.append(f"{indent}  option allow_alias = true;")
    lines += [f"{indent}  {value.name} = {value.number};" for value in enum.value]
    # Enum reserved ranges are inclusive in the descriptor, message ones exclusive.
    lines += [f"{indent}  reserved {r.start} to {r.end};" for r in enum.reserved_range]
    return [*lines, f"{indent}}}"]


def _message_lines(message: descriptor_pb2.DescriptorProto, indent: str) -> list[str]:
    inner = indent + "  "
    maps = {nested.name: nested for nested in message.nested_type if nested.options.map_entry}
    lines = [f"{indent}message {message.name} {{"]
    for enum in message.enum_type:
        lines += _enum_lines(enum, inner)
    for nested in message.nested_type:
        if nested.name not in maps:
            lines += _message_lines(nested, inner)

    def field_line(field: descriptor_pb2.FieldDescriptorProto, at: str) -> str:
        entry = maps.get(field.type_name.rsplit(".", 1)[-1])
        if entry is not None and field.label == _LABEL.LABEL_REPEATED:
            key, value = entry.field
            kind = f"map<{_type_name(key)}, {_type_name(value)}>"
        else:
            label = {_LABEL.LABEL_REPEATED: "repeated ", _LABEL.LABEL_REQUIRED: "required "}.get(
                field.label, "optional " if field.proto3_optional else "")
            kind = label + _type_name(field)
        packed = " [packed = false]" if field.options.HasField("packed") and \
            not field.options.packed else ""
        return f"{at}{kind} {field.name} = {field.number}{packed};"

    real_oneofs = {index for index, _ in enumerate(message.oneof_decl)} - {
        field.oneof_index for field in message.field if field.proto3_optional}
    emitted: set[int] = set()
    for field in message.field:
        if field.HasField("oneof_index") and field.oneof_index in real_oneofs:
            if field.oneof_index in emitted:
                continue
            emitted.add(field.oneof_index)
            lines.append(f"{inner}oneof {message.oneof_decl[field.oneof_index].name} {{")
            lines += [field_line(member, inner + "  ") for member in message.field
                      if member.HasField("oneof_index")
                      and member.oneof_index == field.oneof_index]
            lines.append(f"{inner}}}")
        else:
            lines.append(field_line(field, inner))
    lines += _reserved(message, inner)
    return [*lines, f"{indent}}}"]


def proto_source(file: descriptor_pb2.FileDescriptorProto) -> str:
    """The .proto text of a file descriptor (proto2/proto3, without options beyond the
    structural ones: map entries, packed, allow_alias)."""
    syntax = file.syntax or "proto2"
    if syntax not in ("proto2", "proto3"):
        raise ValueError(f"{file.name}: {syntax} files are not supported")
    lines = [f"// {file.name}, exported from tritonclient's stubs by {Path(__file__).name}.",
             f'syntax = "{syntax}";', ""]
    if file.package:
        lines += [f"package {file.package};", ""]
    lines += [f'import "{dependency}";' for dependency in file.dependency]
    lines += [""] if file.dependency else []
    for enum in file.enum_type:
        lines += [*_enum_lines(enum, ""), ""]
    for message in file.message_type:
        lines += [*_message_lines(message, ""), ""]
    for service in file.service:
        lines.append(f"service {service.name} {{")
        for method in service.method:
            request = ("stream " if method.client_streaming else "") + method.input_type
            response = ("stream " if method.server_streaming else "") + method.output_type
            lines.append(f"  rpc {method.name}({request}) returns ({response});")
        lines += ["}", ""]
    return "\n".join(lines)


def write_proto_sources(descriptor_set: descriptor_pb2.FileDescriptorSet, out_dir: Path
                        ) -> list[Path]:
    """Each file of the set as .proto source under out_dir, at its import path."""
    written = []
    for file in descriptor_set.file:
        path = out_dir / file.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(proto_source(file))
        written.append(path)
    return written


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
    parser.add_argument("--proto-dir", type=Path, help="also write the files as .proto here")
    args = parser.parse_args()
    descriptor_set = export(args.out)
    if args.proto_dir is not None:
        write_proto_sources(descriptor_set, args.proto_dir)
    names = ", ".join(file.name for file in descriptor_set.file)
    print(f"wrote {args.out}: {KSERVE_SERVICE} in {len(descriptor_set.file)} files ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
