"""The contracts in protos/ hold up outside Python and over time.

Each check runs the real tool (buf, Debian's protoc + g++ + javac, node with grpc-js), mostly
through the scripts in tools/contracts/. Every gate (lint, breaking, stub freshness, C++/Java
compilation, the Node call) also gets a broken input and must fail on it, so none of them
passes vacuously.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from maas.registry.v1 import model_pb2, registry_service_pb2, registry_service_pb2_grpc
from maas_registry.server import build_server as build_registry_server
from maas_registry.settings import RegistrySettings

from tests.support.node import run_node

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
TOOLS = REPO / "tools"
CONTRACT_TOOLS = TOOLS / "contracts"
NODE_MODULES = TOOLS / "node_modules"
BUF = NODE_MODULES / ".bin" / "buf"
API_SRC = REPO / "libs" / "maas-api" / "src"

INSTALL_HINT = "run `make install` (npm tools, Debian protobuf-compiler/libprotobuf-dev/-java)"


def require(*executables: str | Path) -> None:
    """Fail, not skip: a contract check that silently skips guards nothing."""
    for executable in executables:
        if shutil.which(str(executable)) is None:
            pytest.fail(f"{executable} not found; {INSTALL_HINT}")


def run(*cmd: str | Path, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def edit(path: Path, old: str, new: str) -> None:
    """Replace old by new once; fail loudly when old is gone, so no edit is silently a no-op."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}; update the test to the current protos"
    path.write_text(text.replace(old, new, 1))


# --- buf lint -------------------------------------------------------------------------------


def test_buf_lint_is_clean():
    require(BUF)
    result = run(BUF, "lint", cwd=PROTOS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_reports_a_missing_comment_and_a_nonstandard_request_name(tmp_path):
    require(BUF)
    protos = tmp_path / "protos"
    shutil.copytree(PROTOS, protos)
    # RPC_REQUEST_STANDARD_NAME is ignored only in inference_service.proto: it must still
    # apply to the registry.
    edit(
        protos / "maas/registry/v1/registry_service.proto",
        "service RegistryService {\n",
        "service RegistryService {\n"
        "  // Looks a model up.\n"
        "  rpc LookupModel(GetModelRequest) returns (Model);\n",
    )
    with (protos / "maas/registry/v1/model.proto").open("a") as model_proto:
        model_proto.write("\nmessage Undocumented {\n  string name = 1;\n}\n")

    result = run(BUF, "lint", cwd=protos)

    assert result.returncode != 0
    assert 'Message "Undocumented" should have a non-empty comment' in result.stdout
    assert 'should be named "LookupModelRequest"' in result.stdout


# --- stub freshness -------------------------------------------------------------------------


def test_generated_stubs_are_current():
    result = run(sys.executable, TOOLS / "gen_protos.py", "--check", "--out", API_SRC)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stub_check_fails_on_an_edited_stub(tmp_path):
    shutil.copytree(API_SRC / "maas", tmp_path / "maas")
    stub = tmp_path / "maas/registry/v1/model_pb2.py"
    stub.write_text(stub.read_text() + "\n# hand edit\n")

    result = run(sys.executable, TOOLS / "gen_protos.py", "--check", "--out", tmp_path)

    assert result.returncode == 1
    assert "differs: maas/registry/v1/model_pb2.py" in result.stdout


# --- buf breaking against the previous commit ------------------------------------------------

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "contract-test",
    "GIT_AUTHOR_EMAIL": "contract-test@example.invalid",
    "GIT_COMMITTER_NAME": "contract-test",
    "GIT_COMMITTER_EMAIL": "contract-test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
        cwd=repo,
        env=GIT_ENV,
        check=True,
        capture_output=True,
    )


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


@pytest.fixture
def contract_repo(tmp_path) -> Path:
    """A git repository whose one commit holds a copy of today's protos/ (with buf.yaml)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    shutil.copytree(PROTOS, repo / "protos")
    commit_all(repo, "contracts")
    return repo


def buf_breaking(repo: Path, *args: str) -> subprocess.CompletedProcess:
    require(BUF)
    return run(
        sys.executable, CONTRACT_TOOLS / "buf_breaking.py", "--repo", repo, "--buf", BUF, *args
    )


def test_breaking_fails_when_a_field_is_deleted(contract_repo):
    edit(
        contract_repo / "protos/maas/registry/v1/model.proto",
        "  // Optional. Human-readable name.\n  string display_name = 2;\n",
        "",
    )
    commit_all(contract_repo, "drop Model.display_name")

    result = buf_breaking(contract_repo)

    assert result.returncode == 1, result.stdout + result.stderr
    assert 'field "2" with name "display_name" on message "Model" was deleted' in result.stdout


def test_breaking_fails_when_an_rpc_is_renamed(contract_repo):
    edit(
        contract_repo / "protos/maas/registry/v1/registry_service.proto",
        "rpc GetModel(GetModelRequest)",
        "rpc FetchModel(GetModelRequest)",
    )
    commit_all(contract_repo, "rename GetModel")

    result = buf_breaking(contract_repo)

    assert result.returncode == 1, result.stdout + result.stderr
    assert 'RPC "GetModel" on service "RegistryService" was deleted' in result.stdout


def test_breaking_passes_an_additive_change(contract_repo):
    edit(
        contract_repo / "protos/maas/registry/v1/model.proto",
        "  map<string, int64> aliases = 10 [(maas.common.v1.field_behavior) = "
        "FIELD_BEHAVIOR_OUTPUT_ONLY];\n",
        "  map<string, int64> aliases = 10 [(maas.common.v1.field_behavior) = "
        "FIELD_BEHAVIOR_OUTPUT_ONLY];\n  // Output only. Who owns the model.\n"
        "  string owner = 11 [(maas.common.v1.field_behavior) = FIELD_BEHAVIOR_OUTPUT_ONLY];\n",
    )
    edit(
        contract_repo / "protos/maas/registry/v1/registry_service.proto",
        "service RegistryService {\n",
        "service RegistryService {\n  // Gets a model by another route.\n"
        "  rpc GetModelAgain(GetModelRequest) returns (Model);\n",
    )
    commit_all(contract_repo, "add Model.owner and an RPC")

    result = buf_breaking(contract_repo)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "is compatible with HEAD~1" in result.stdout


def test_breaking_also_sees_uncommitted_edits_against_head(contract_repo):
    edit(
        contract_repo / "protos/maas/registry/v1/model.proto",
        "  string etag = 8;\n",
        "  int64 etag = 8;\n",
    )

    result = buf_breaking(contract_repo, "--against", "HEAD")

    assert result.returncode == 1, result.stdout + result.stderr
    assert 'changed type from "string" to "int64"' in result.stdout


def test_breaking_skips_without_a_previous_commit(contract_repo):
    result = buf_breaking(contract_repo)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped, there is no commit HEAD~1" in result.stdout


def test_breaking_skips_when_the_previous_commit_had_no_buf_yaml(contract_repo):
    # The first commit that adds buf.yaml is not judged against unguarded contracts, even
    # when it breaks them.
    git(contract_repo, "rm", "-q", "protos/buf.yaml")
    git(contract_repo, "commit", "-q", "--amend", "-m", "contracts without buf.yaml")
    shutil.copy(PROTOS / "buf.yaml", contract_repo / "protos/buf.yaml")
    edit(contract_repo / "protos/maas/registry/v1/model.proto", "  string etag = 8;\n", "")
    commit_all(contract_repo, "guard contracts, drop etag")

    result = buf_breaking(contract_repo)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "has no protos/buf.yaml" in result.stdout


def test_breaking_refuses_a_shallow_clone_missing_the_previous_commit(contract_repo, tmp_path):
    (contract_repo / "protos/maas/registry/v1/NOTES.md").write_text("a second commit\n")
    commit_all(contract_repo, "second")
    shallow = tmp_path / "shallow"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", contract_repo.as_uri(), str(shallow)],
        check=True,
        capture_output=True,
        env=GIT_ENV,
    )

    result = buf_breaking(shallow)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "shallow clone" in result.stderr


# --- C++ and Java from Debian's protoc ------------------------------------------------------


def cross_language(*args: str | Path, protoc: str | Path = "protoc") -> subprocess.CompletedProcess:
    require(protoc, "g++", "javac", "pkg-config")
    return run(sys.executable, CONTRACT_TOOLS / "cross_language.py", "--protoc", protoc, *args)


@pytest.mark.slow
def test_contracts_generate_and_compile_for_cpp_and_java(tmp_path):
    result = cross_language("--work-dir", tmp_path, "--jobs", "2")

    assert result.returncode == 0, result.stdout + result.stderr
    headers = run("pkg-config", "--modversion", "protobuf").stdout.strip()
    assert result.stdout.startswith(f"libprotoc {headers}:"), result.stdout  # Debian's, matching
    assert (tmp_path / "cpp/maas/common/v1/access.pb.h").exists()  # the MethodOptions extension
    registry_classes = tmp_path / "classes/dev/maas/registry/v1"
    assert (registry_classes / "Model.class").exists()


def one_file_proto_root(tmp_path: Path, body: str) -> Path:
    root = tmp_path / "protos"
    (root / "probe").mkdir(parents=True)
    (root / "probe/probe.proto").write_text(f'syntax = "proto3";\npackage probe;\n{body}')
    return root


def test_cross_language_check_refuses_a_protoc_of_another_release(tmp_path):
    # grpcio-tools bundles a newer protoc; its C++ would not compile against Debian's headers.
    other_protoc = tmp_path / "protoc"
    other_protoc.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m grpc_tools.protoc "$@"\n')
    other_protoc.chmod(0o755)

    result = cross_language(protoc=other_protoc)

    assert result.returncode == 1
    assert "but the protobuf headers are" in result.stderr


def test_cross_language_check_fails_when_cpp_does_not_compile(tmp_path):
    # `errno` is a C macro: protoc accepts the field, the generated accessor does not compile.
    root = one_file_proto_root(tmp_path, "message Reading {\n  int32 errno = 1;\n}\n")

    result = cross_language("--proto-root", root)

    assert result.returncode == 1
    assert "g++ probe/probe.pb.cc failed" in result.stderr


def test_cross_language_check_fails_when_java_does_not_compile(tmp_path):
    # A Java keyword in java_package: protoc accepts it, javac does not.
    root = one_file_proto_root(
        tmp_path, 'option java_package = "dev.maas.int.v1";\nmessage Reading {\n  int32 v = 1;\n}\n'
    )

    result = cross_language("--proto-root", root)

    assert result.returncode == 1
    assert "javac failed" in result.stderr


# --- KServe v2 descriptor set from tritonclient's stubs --------------------------------------


@pytest.fixture
def kserve_descriptor_set(tmp_path) -> Path:
    out = tmp_path / "kserve.binpb"
    result = run(sys.executable, CONTRACT_TOOLS / "export_kserve_descriptors.py", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_kserve_descriptor_set_holds_the_inference_service(kserve_descriptor_set):
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(kserve_descriptor_set.read_bytes())
    # A fresh pool accepts each file only after its imports: proves order and completeness.
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_set.file:
        pool.Add(file)

    service = pool.FindServiceByName("inference.GRPCInferenceService")
    infer = service.methods_by_name["ModelInfer"]
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert infer.output_type.full_name == "inference.ModelInferResponse"
    assert "ModelStreamInfer" in service.methods_by_name
    assert pool.FindMessageTypeByName("inference.ModelConfig")  # from model_config.proto


def test_protoc_generates_cpp_from_the_kserve_descriptor_set(kserve_descriptor_set, tmp_path):
    require("protoc", "g++")
    out = tmp_path / "cpp"
    out.mkdir()

    generated = run(
        "protoc",
        f"--descriptor_set_in={kserve_descriptor_set}",
        f"--cpp_out={out}",
        "grpc_service.proto",
        "model_config.proto",
    )
    assert generated.returncode == 0, generated.stderr
    compiled = run("g++", "-std=c++17", "-fsyntax-only", f"-I{out}", out / "grpc_service.pb.cc")
    assert compiled.returncode == 0, compiled.stderr[:4000]


# --- Node (grpc-js + proto-loader) ----------------------------------------------------------


async def test_grpc_js_loads_the_kserve_descriptor_set(kserve_descriptor_set, tmp_path):
    script = """
const protoLoader = require('@grpc/proto-loader');
const fs = require('fs');
const definition = protoLoader.loadFileDescriptorSetFromBuffer(fs.readFileSync(process.argv[2]));
const service = definition['inference.GRPCInferenceService'];
console.log(JSON.stringify({methods: Object.keys(service), path: service.ModelInfer.path}));
"""
    printed = await run_node(tmp_path, script, str(kserve_descriptor_set))

    assert "ModelInfer" in printed["methods"]
    assert printed["path"] == "/inference.GRPCInferenceService/ModelInfer"


NODE_GET_MODEL = """
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const [address, protos, name] = process.argv.slice(2);
const definition = protoLoader.loadSync('maas/registry/v1/registry_service.proto', {
  includeDirs: [protos], keepCase: true, longs: String, enums: String, defaults: false,
});
const {RegistryService} = grpc.loadPackageDefinition(definition).maas.registry.v1;
const client = new RegistryService(address, grpc.credentials.createInsecure());
client.getModel({name}, {deadline: Date.now() + 10000}, (error, model) => {
  console.log(JSON.stringify(error ? {code: error.code, details: error.details} : {model}));
  client.close();
});
"""


async def test_node_client_calls_a_python_server(tmp_path):
    """grpc-js against the real registry service (started in this process, tokens off)."""
    server = build_registry_server(RegistrySettings(state_dir=tmp_path / "registry", port=0,
                                                    auth_enabled=False))
    port = await server.start()
    try:
        address = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(address) as channel:
            await registry_service_pb2_grpc.RegistryServiceStub(channel).CreateModel(
                registry_service_pb2.CreateModelRequest(model_id="x", model=model_pb2.Model(
                    display_name="X", labels={"team": "vision"})))
        found = await run_node(tmp_path, NODE_GET_MODEL, address, str(PROTOS), "models/x")
        missing = await run_node(tmp_path, NODE_GET_MODEL, address, str(PROTOS), "models/y")
    finally:
        await server.stop(0)

    assert found["model"]["name"] == "models/x"
    assert (found["model"]["display_name"], found["model"]["labels"]) == ("X", {"team": "vision"})
    assert missing["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "models/y" in missing["details"]
