"""Small artifacts for tests and benchmarks."""

from __future__ import annotations


def varint(value: int) -> bytes:
    """Protobuf base-128 varint encoding."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def onnx_like(payload: bytes) -> bytes:
    """Top-level ONNX ModelProto framing (ir_version, then a length-delimited graph field)
    around opaque bytes: what the registry's light ONNX check accepts."""
    return b"\x08\x07" + b"\x3a" + varint(len(payload)) + payload
