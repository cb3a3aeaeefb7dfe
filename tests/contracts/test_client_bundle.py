"""`make clients`: the bundle is self-contained and a Node client works from it alone.

protoc compiles every .proto of the bundle with the bundle as its only include path; the
KServe-v2 .proto it carries describes exactly tritonclient's contract; stubs exist for every
language; and a grpc-js client that loads nothing but the bundle (node/maas_clients.js) lists
models, reads a deployment's served signature, predicts, calls KServe ModelInfer and decodes
the google.rpc.Status details (ErrorInfo, BadRequest) of errors, against a real registry,
inference service and Triton.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from maas.inference.v1 import inference_service_pb2 as inf
from tritonclient.grpc import model_config_pb2, service_pb2

from tests.inference.test_inference_service import create, suite  # noqa: F401 (fixture)
from tests.support.node import run_node

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "tools" / "contracts" / "client_bundle.py"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clients") / "clients"
    built = subprocess.run([sys.executable, BUILD, "--require-all", "--out", out],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return out


def compile_bundle(bundle: Path, out: Path, *files: str) -> subprocess.CompletedProcess:
    # grpcio-tools' protoc adds no include path of its own: what resolves is in the bundle.
    return subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{bundle}",
                           "--include_imports", f"--descriptor_set_out={out}", *files],
                          capture_output=True, text=True)


def test_every_proto_of_the_bundle_compiles_with_only_the_bundle_as_include_path(bundle,
                                                                                 tmp_path):
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*.proto"))
    compiled = compile_bundle(bundle, tmp_path / "all.binpb", *files)

    assert compiled.returncode == 0, compiled.stderr
    assert {"maas/registry/v1/registry_service.proto", "google/rpc/status.proto",
            "google/rpc/error_details.proto", "google/rpc/code.proto", "grpc_service.proto",
            "model_config.proto", "google/protobuf/struct.proto"} <= set(files)
    missing = compile_bundle(bundle / "maas", tmp_path / "x.binpb", "registry/v1/model.proto")
    assert missing.returncode != 0  # the check would notice an import from elsewhere


def structure(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The file without what a .proto text does not carry: json names, empty options."""
    copy = descriptor_pb2.FileDescriptorProto.FromString(file.SerializeToString())

    def clear(message):
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            clear(nested)

    for message in copy.message_type:
        clear(message)
    for service in copy.service:
        for method in service.method:
            if not method.options.ByteSize():
                method.ClearField("options")
    return copy


def test_the_kserve_proto_describes_exactly_tritonclients_contract(bundle, tmp_path):
    compiled = compile_bundle(bundle, tmp_path / "kserve.binpb", "grpc_service.proto")
    assert compiled.returncode == 0, compiled.stderr
    exported = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(
        (tmp_path / "kserve.binpb").read_bytes()).file}

    for module in (service_pb2, model_config_pb2):
        original = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(original)
        assert structure(exported[original.name]) == structure(original), original.name


def test_stubs_are_generated_for_node_go_java_and_cpp(bundle):
    expected = ["node/maas_clients.js", "node/types/registry_service.ts",
                "go/maas/registry/v1/registry_service_grpc.pb.go", "go/inference/grpc_service.pb.go",
                "go/go.mod", "java/dev/maas/registry/v1/RegistryServiceGrpc.java",
                "java/inference/GRPCInferenceServiceGrpc.java",
                "cpp/maas/registry/v1/registry_service.grpc.pb.h", "cpp/google/rpc/status.pb.h",
                "cpp/grpc_service.grpc.pb.cc", "README.md"]
    assert [path for path in expected if not (bundle / path).is_file()] == []


NODE_CLIENT = """
const [loader, registryAddress, registryToken, inferenceAddress, token] = process.argv.slice(2);
const maas = require(loader);
const {registry, inference, usage, kserve} = maas.load();
const insecure = maas.grpc.credentials.createInsecure();
const bearer = (client) => maas.bearer(client === registryClient ? registryToken : token);
const call = (client, method, request) => new Promise((resolve) =>
  client[method](request, bearer(client), (error, reply) => resolve(error
    ? {code: error.code, details: maas.statusDetails(error)} : reply)));
const registryClient = new registry.RegistryService(registryAddress, insecure);
const features = (count) => Buffer.from(new Float32Array(count).fill(1).buffer);
(async () => {
  const inferenceClient = new inference.InferenceService(inferenceAddress, insecure);
  const kserveClient = new kserve.GRPCInferenceService(inferenceAddress, insecure);
  const usageClient = new usage.UsageService(inferenceAddress, insecure);
  const models = await call(registryClient, 'listModels', {});
  const deployment = await call(inferenceClient, 'getDeployment', {name: 'deployments/bundle'});
  const prediction = await call(inferenceClient, 'predict', {deployment: 'deployments/bundle',
    inputs: [{name: 'features', datatype: 'DATA_TYPE_FP32', shape: [1, 64], raw_data: features(64)}]});
  const infer = await call(kserveClient, 'modelInfer', {model_name: 'bundle',
    inputs: [{name: 'features', datatype: 'FP32', shape: [1, 64]}], raw_input_contents: [features(64)]});
  const badShape = await call(inferenceClient, 'predict', {deployment: 'deployments/bundle',
    inputs: [{name: 'features', datatype: 'DATA_TYPE_FP32', shape: [1, 63], raw_data: features(63)}]});
  const missing = await call(inferenceClient, 'getDeployment', {name: 'deployments/nowhere'});
  const usageRecords = await call(usageClient, 'listUsageRecords', {page_size: 5});
  const badUsageFilter = await call(usageClient, 'listUsageRecords', {filter: 'tenant ='});
  console.log(JSON.stringify({models, deployment, prediction, infer, badShape, missing,
                              usageRecords, badUsageFilter}));
  for (const client of [registryClient, inferenceClient, kserveClient, usageClient]) client.close();
})();
"""


@pytest_asyncio.fixture(loop_scope="session")
async def deployed(suite):  # noqa: F811 (the fixture imported above)
    await create(suite, "bundle", model="models/digits@prod")
    yield suite
    await suite.predict_stub().DeleteDeployment(inf.DeleteDeploymentRequest(name="deployments/bundle"))


@pytest.mark.triton
@pytest.mark.asyncio(loop_scope="session")
async def test_a_node_client_built_only_from_the_bundle_works_against_the_suite(
        bundle, deployed, tmp_path):
    seen = await run_node(tmp_path, NODE_CLIENT, str(bundle / "node" / "maas_clients.js"),
                          deployed.registry_target, deployed.registry_token, deployed.target,
                          deployed.token)

    assert [m["name"] for m in seen["models"]["models"]] == ["models/digits"]
    [served] = seen["deployment"]["served_versions"]
    assert served["model_version"] == "models/digits/versions/1"
    assert [(t["name"], t["datatype"], t["shape"]) for t in served["inputs"]] == [
        ("features", "DATA_TYPE_FP32", ["64"])]
    assert seen["prediction"]["outputs"][0]["shape"] == ["1", "10"]
    assert seen["infer"]["model_name"] == "bundle"
    assert seen["infer"]["outputs"][0]["shape"] == ["1", "10"]
    assert seen["badShape"]["code"] == 3  # INVALID_ARGUMENT
    details = {d["@type"]: d for d in seen["badShape"]["details"]}
    assert details["google.rpc.ErrorInfo"]["reason"] == "FIELD_INVALID"
    assert details["google.rpc.ErrorInfo"]["domain"] == "maas.dev"
    assert [v["field"] for v in details["google.rpc.BadRequest"]["field_violations"]] == [
        "inputs[0].shape"]
    assert seen["missing"]["code"] == 5  # NOT_FOUND
    info = next(d for d in seen["missing"]["details"] if d["@type"] == "google.rpc.ErrorInfo")
    assert info["reason"] == "DEPLOYMENT_NOT_FOUND"
    assert isinstance(seen["usageRecords"]["usage_records"], list)  # UsageService reached
    assert seen["badUsageFilter"]["code"] == 3  # INVALID_ARGUMENT naming the filter
    usage_details = {d["@type"]: d for d in seen["badUsageFilter"]["details"]}
    assert [v["field"] for v in usage_details["google.rpc.BadRequest"]["field_violations"]] == [
        "filter"]
