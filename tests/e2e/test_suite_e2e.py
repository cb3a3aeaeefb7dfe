"""The whole suite as `maas up` runs it: the demo flow, then a Node.js client on top.

Registry, trainer, compressor and inference (with its real Triton) run as supervised
subprocesses with one tokens file and static discovery; the demo (`maas demo`) trains,
compresses four ways behind gates, moves `production`, deploys a 90/10 canary with a shadow
and classifies through the gateway; its JSON is checked here; then grpc-js clients loaded
from the protos read the same state with a token.
"""

from __future__ import annotations

import json

import pytest
from maas_cli.demo import run_demo
from maas_cli.local_suite import LocalSuite

from tests.support.node import PROTOS, run_node

pytestmark = [pytest.mark.triton, pytest.mark.slow]

NODE_CLIENT = """
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const [registryAddress, inferenceAddress, protos, token] = process.argv.slice(2);
const options = {includeDirs: [protos], keepCase: true, longs: String, enums: String};
const load = (file) => grpc.loadPackageDefinition(protoLoader.loadSync(file, options));
const registry = load('maas/registry/v1/registry_service.proto').maas.registry.v1;
const inference = load('maas/inference/v1/inference_service.proto').maas.inference.v1;
const metadata = new grpc.Metadata();
metadata.add('authorization', `Bearer ${token}`);
const call = (client, method, request, md) => new Promise((resolve) =>
  client[method](request, md, (error, reply) =>
    resolve(error ? {code: error.code} : reply)));
(async () => {
  const registryClient = new registry.RegistryService(registryAddress,
                                                      grpc.credentials.createInsecure());
  const inferenceClient = new inference.InferenceService(inferenceAddress,
                                                         grpc.credentials.createInsecure());
  const version = await call(registryClient, 'getModelVersion',
                             {name: 'models/digits@production'}, metadata);
  const unauthenticated = await call(registryClient, 'getModelVersion',
                                     {name: 'models/digits@production'}, new grpc.Metadata());
  const pixels = new Float32Array(64).fill(8);
  const prediction = await call(inferenceClient, 'predict', {deployment: 'deployments/digits',
    inputs: [{name: 'input', datatype: 'DATA_TYPE_FP32', shape: [1, 64],
              raw_data: Buffer.from(pixels.buffer)}]}, metadata);
  console.log(JSON.stringify({version, unauthenticated, prediction}));
  registryClient.close();
  inferenceClient.close();
})();
"""


METHODS = {"train (fp32)", "train (2nd run)", "prune", "quantize int8", "distill", "fuse"}


async def test_demo_flow_and_a_node_client_on_the_running_suite(tmp_path):
    suite = LocalSuite(tmp_path / "suite", fixed_ports=False)
    await suite.start()
    try:
        result = (await run_demo(suite, log=lambda line: None)).to_json()
        seen = await run_node(tmp_path, NODE_CLIENT, suite.services["registry"].target,
                              suite.services["inference"].target, str(PROTOS), suite.token())
    finally:
        await suite.stop()
    json.dumps(result)  # what `maas demo --json` prints
    assert result["passed"], result["error"]
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == METHODS
    trained = result["trained"]
    assert rows["train (fp32)"]["version"] == trained == "models/digits/versions/1"

    production = [row for row in result["rows"] if row["role"].startswith("production")]
    assert [row["version"] for row in production] == [result["production"]]
    assert production[0]["compressed"] and production[0]["gate"] == "passed"
    for row in result["rows"]:  # a failed gate is a row with a reason, never a version
        assert (row["gate"] == "failed") == bool(row["error"]) == (row["compressed"]
                                                                  and not row["version"])

    deployment = result["deployment"]
    assert deployment["traffic"] == {result["production"]: 90, trained: 10}
    served = {row["version"]: row["requests_served"] for row in result["rows"] if row["version"]}
    assert sum(served.values()) == deployment["requests"] >= 400
    assert 0.04 <= served[trained] / deployment["requests"] <= 0.18  # sticky by request id
    assert deployment["predictions"] >= 3000

    shadow = [row for row in result["rows"] if row["role"] == "shadow"]
    assert [row["version"] for row in shadow] == [deployment["shadow"]]
    assert shadow[0]["version"] not in deployment["traffic"]
    assert 0.0 <= shadow[0]["shadow_agreement"] <= 1.0
    assert deployment["shadow_stats"]["compared"] > 0

    edges = {tuple(edge) for edge in result["lineage_edges"]}
    for row in result["rows"]:
        if row["compressed"] and row["version"]:
            assert (trained, row["version"]) in edges, row["method"]
    assert (rows["train (2nd run)"]["version"], rows["fuse"]["version"]) in edges
    assert [tree["name"] for tree in result["lineage"]] == [
        trained, rows["train (2nd run)"]["version"]]
    assert set(result["phases"]) == {"train", "compress", "deploy", "predict", "lineage"}

    assert seen["version"]["name"] == result["production"]
    assert len(seen["version"]["artifact"]["sha256"]) == 64
    assert seen["unauthenticated"]["code"] == 16  # UNAUTHENTICATED
    assert seen["prediction"]["model_version"] in deployment["traffic"]
    assert seen["prediction"]["outputs"][0]["shape"] == ["1", "10"]
