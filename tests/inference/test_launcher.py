"""Starting the bundled tritonserver: the environment it needs, and failures that say why."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import sysconfig
from pathlib import Path

import pytest
from maas_inference.triton import TritonServerProcess, TritonStartError
from maas_inference.triton.launcher import (
    BundledTriton,
    prepare_backend_directory,
    running_python_version,
    triton_environment,
)
from maas_runtime.errors import FailedPrecondition

from tests.inference.servers import triton_process_config


def test_the_wheel_ships_binary_backend_and_this_pythons_stub() -> None:
    bundle = BundledTriton.locate()
    assert bundle.binary.is_file() and os.access(bundle.binary, os.X_OK)
    assert (bundle.python_backend_dir / "libtriton_python.so").is_file()
    assert bundle.python_backend_stub(running_python_version()).is_file()
    assert bundle.shared_libraries_dir.name == "nvidia_pytriton.libs"
    assert bundle.shared_libraries_dir.is_dir()


def test_environment_puts_libpython_wheel_libs_and_venv_bin_first() -> None:
    bundle = BundledTriton.locate()
    environment = triton_environment(
        bundle,
        {"LD_LIBRARY_PATH": "/opt/existing/lib", "PATH": "/usr/bin:/bin", "KEEP": "me"},
    )
    assert environment["LD_LIBRARY_PATH"].split(os.pathsep) == [
        sysconfig.get_config_var("LIBDIR"),
        os.fspath(bundle.shared_libraries_dir),
        "/opt/existing/lib",
    ]
    assert environment["PATH"].split(os.pathsep) == [
        os.fspath(Path(sys.executable).parent),
        "/usr/bin",
        "/bin",
    ]
    assert environment["KEEP"] == "me"


def test_environment_without_existing_paths() -> None:
    environment = triton_environment(BundledTriton.locate(), {})
    assert len(environment["LD_LIBRARY_PATH"].split(os.pathsep)) == 2
    assert environment["PATH"] == os.fspath(Path(sys.executable).parent)


def test_backend_directory_holds_backend_and_matching_stub(tmp_path) -> None:
    bundle = BundledTriton.locate()
    backends = prepare_backend_directory(bundle, tmp_path / "backends")
    python_backend = backends / "python"
    stub = python_backend / "triton_python_backend_stub"
    assert stub.read_bytes() == bundle.python_backend_stub(running_python_version()).read_bytes()
    assert os.access(stub, os.X_OK)
    assert (python_backend / "triton_python_backend_utils.py").is_file()
    # Preparing again (every start does) is a no-op that leaves no temporary files.
    prepare_backend_directory(bundle, tmp_path / "backends")
    assert sorted(p.name for p in python_backend.iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]


def test_missing_stub_for_a_python_version_is_a_failed_precondition(tmp_path) -> None:
    with pytest.raises(FailedPrecondition, match="3.99"):
        prepare_backend_directory(BundledTriton.locate(), tmp_path, python_version="3.99")


@pytest.mark.triton
async def test_a_server_that_cannot_start_reports_its_log(tmp_path) -> None:
    config = triton_process_config(tmp_path)
    process = TritonServerProcess(dataclasses.replace(config, extra_args=("--model-control-mode=sometimes",)))
    with pytest.raises(TritonStartError, match="invalid argument for --model-control-mode"):
        await process.start()
    assert not process.is_running


@pytest.mark.triton
async def test_a_configured_port_in_use_fails_fast_without_retrying(tmp_path) -> None:
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        config = triton_process_config(tmp_path)
        process = TritonServerProcess(dataclasses.replace(config, grpc_port=port))
        with pytest.raises(TritonStartError, match="already in use"):
            await process.start()
    assert process.start_count == 1
    assert not process.is_running
