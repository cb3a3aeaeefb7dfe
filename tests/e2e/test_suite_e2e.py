"""The whole suite as `maas up` runs it: the demo flow, then a Node.js client on top.

Registry, trainer and inference (with its real Triton) run as supervised subprocesses with
one tokens file and static discovery; the demo trains digits, registers, deploys and
classifies; then generated-from-protos grpc-js clients read the same state with a token.
"""

from __future__ import annotations

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


async def test_demo_flow_and_a_node_client_on_the_running_suite(tmp_path):
    suite = LocalSuite(tmp_path / "suite", fixed_ports=False)
    await suite.start()
    try:
        result = await run_demo(suite)
        assert result["predict_accuracy"] >= 0.9
        assert result["version"] == "models/digits/versions/1"
        seen = await run_node(tmp_path, NODE_CLIENT, suite.services["registry"].target,
                              suite.services["inference"].target, str(PROTOS), suite.token())
    finally:
        await suite.stop()
    assert seen["version"]["name"] == "models/digits/versions/1"
    assert len(seen["version"]["artifact"]["sha256"]) == 64
    assert seen["unauthenticated"]["code"] == 16  # UNAUTHENTICATED
    assert seen["prediction"]["model_version"] == "models/digits/versions/1"
    assert seen["prediction"]["outputs"][0]["shape"] == ["1", "10"]
