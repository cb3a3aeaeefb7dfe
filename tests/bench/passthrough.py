"""Reference for the inference benchmark: the thinnest possible Python hop in front of Triton.

A grpc.aio server whose only method forwards ModelInfer bytes to Triton (model name
appended) and returns Triton's bytes: no auth, no routing, no checks. The gateway is measured
against it to separate the cost of any Python hop from the cost of the gateway's features.

Run by the benchmark: `python -m tests.bench.passthrough PORT TRITON_HOST:PORT MODEL`.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from maas_inference.triton.client import with_model_name

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


async def serve(port: int, triton: str, model: str) -> None:
    channel = grpc.aio.insecure_channel(triton)
    forward = channel.unary_unary(MODEL_INFER)

    async def model_infer(request: bytes, context) -> bytes:
        return await forward(with_model_name(request, model))

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
