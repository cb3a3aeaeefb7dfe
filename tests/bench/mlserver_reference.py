"""MLServer as a second reference in the inference benchmark, serving the same model.

MLServer and its dependencies would fight the project's pins, so it gets a virtual
environment of its own under the benchmark directory (made once: torch from the CPU build on
disk, then `mlserver`); when that install fails the benchmark prints why and goes on without
it. The model is the benchmark's MLP exported to TorchScript, served by a small custom
runtime (`mlserver_runtime.py`) on MLServer's KServe-v2 gRPC endpoint, so the same client
code measures it. MLServer runs inference in its main process (`parallel_workers: 0`):
for a model this small a worker pool only adds a hop, and its pool does not start under the
uvloop release that pip resolves today.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.processes import free_port

MLSERVER_VERSION = "1.7.1"
TORCH_VERSION = "2.13.0"
MODEL_NAME = "mlp"
_RUNTIME = Path(__file__).with_name("mlserver_runtime.py")


@dataclass
class MLServerReference:
    """A running MLServer; `grpc_target` speaks KServe-v2."""

    process: subprocess.Popen
    grpc_target: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def mlserver_python(bench_dir: Path) -> tuple[Path | None, str]:
    """The interpreter of MLServer's environment (made on first use), or None and why not."""
    venv = bench_dir.resolve() / f"mlserver-{MLSERVER_VERSION}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python, ""
    shutil.rmtree(venv, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             # torch first, by exact version: the CPU build on disk, never a CUDA download.
             [str(python), "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}"],
             [str(python), "-m", "pip", "install", "-q", f"mlserver=={MLSERVER_VERSION}"]]
    print(f"installing MLServer {MLSERVER_VERSION} into {venv} (once)...", flush=True)
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "WARNING" not in line]
            return None, f"`{' '.join(step[2:])}` failed: {' '.join(lines[-2:])[:200]}"
    stamp.touch()
    return python, ""


def write_model_folder(folder: Path, module: torch.nn.Module, grpc_port: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module.eval()).save(str(folder / "model.pt"))
    shutil.copy(_RUNTIME, folder / "mlserver_runtime.py")
    (folder / "model-settings.json").write_text(json.dumps({
        "name": MODEL_NAME, "implementation": "mlserver_runtime.TorchScriptRuntime",
        "parameters": {"uri": "./model.pt"}}))
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": free_port(),
        "metrics_port": free_port(), "parallel_workers": 0}))


async def start_mlserver(python: Path, folder: Path, module: torch.nn.Module,
                         timeout: float = 90.0) -> MLServerReference:
    folder, grpc_port = folder.resolve(), free_port()
    write_model_folder(folder, module, grpc_port)
    log = (folder / "mlserver.log").open("w")
    process = subprocess.Popen([str(python.parent / "mlserver"), "start", str(folder)],
                               cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    reference = MLServerReference(process, f"127.0.0.1:{grpc_port}")
    channel = grpc.aio.insecure_channel(reference.grpc_target)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if process.poll() is not None:
                break
            try:
                if (await stub.ModelReady(service_pb2.ModelReadyRequest(name=MODEL_NAME),
                                          timeout=1)).ready:
                    return reference
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    finally:
        await channel.close()
    reference.stop()
    raise RuntimeError(f"MLServer did not become ready; see {folder / 'mlserver.log'}")
