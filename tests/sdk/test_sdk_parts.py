"""The SDK's parts without the whole suite: connection precedence, strict job specs, tensors,
lineage trees, and a registry behind mutual TLS reached with the client's TLS arguments."""

from __future__ import annotations

import asyncio
import json

import maas
import numpy as np
import pytest
from maas.common.v1 import tensor_pb2
from maas.compressor.v1 import compression_job_pb2 as cj
from maas.registry.v1 import audit_pb2
from maas_cli.local_suite import SuiteTls
from maas_sdk.connection import Connection, parse_targets
from maas_sdk.jobs import compression_spec_from_document, compression_step
from maas_sdk.lineage import LineageTree
from maas_sdk.tensors import from_tensor, to_tensor

from tests.support.processes import ServiceProcess
from tests.support.tls import make_certificates


def test_the_local_suite_is_found_through_its_state_dir_and_arguments_win(tmp_path, monkeypatch):
    for name in ("MAAS_TOKEN", "MAAS_TARGET", "MAAS_STATIC_ENDPOINTS", "CONSUL_HTTP_ADDR"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "admin.token").write_text("from-the-file\n")
    (tmp_path / "suite.json").write_text(json.dumps({"pid": 1, "endpoints": {
        "registry": "127.0.0.1:7001", "inference": "127.0.0.1:7004"}}))
    found = Connection.resolve(state_dir=tmp_path)
    assert (found.token, found.targets["inference"]) == ("from-the-file", "127.0.0.1:7004")
    monkeypatch.setenv("MAAS_TOKEN", "from-the-env")
    assert Connection.resolve(state_dir=tmp_path).token == "from-the-env"
    given = Connection.resolve(target="gateway:443", token="given", state_dir=tmp_path)
    assert (given.token, set(given.targets.values())) == ("given", {"gateway:443"})
    assert parse_targets("registry=a:1;inference=b:2,c:2") == {"registry": "a:1",
                                                               "inference": "b:2,c:2"}


def test_compression_steps_are_parsed_strictly_with_short_enum_names():
    step = compression_step("quantize:dtype=int8,per_channel=false")
    assert step.quantize.dtype == cj.QUANTIZATION_DTYPE_INT8 and not step.quantize.per_channel
    # A sentence encoder's int8 torch encoder (or a zoo model's torchao weights).
    torch_int8 = compression_step("quantize:dtype=int8,format=torch")
    assert (torch_int8.quantize.dtype, torch_int8.quantize.format) == (cj.QUANTIZATION_DTYPE_INT8,
                                                                       "torch")
    distill = compression_step('distill:epochs=2,student={"kind": "mlp"}')
    assert (distill.distill.epochs, distill.distill.student.kind) == (2, "mlp")
    with pytest.raises(maas.InvalidArgument) as unknown_option:
        compression_step("prune:amount=0.5,ratio=2", index=1)
    assert unknown_option.value.field_violations[0].field == "steps[1].prune.ratio"
    with pytest.raises(maas.InvalidArgument, match="one of int8, fp16, bf16, int4"):
        compression_step("quantize:dtype=int3")
    spec = compression_spec_from_document({"source_model_version": "models/m/versions/1",
                                           "steps": ["convert", {"prune": {"amount": 0.2}}]})
    assert [s.WhichOneof("step") for s in spec.steps] == ["convert", "prune"]


def test_tensors_travel_as_raw_little_endian_bytes_and_come_back_as_views():
    array = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian in, little-endian on the wire
    tensor = to_tensor("input", array)
    assert (tensor.datatype, list(tensor.shape)) == (tensor_pb2.DATA_TYPE_FP32, [3, 4])
    assert tensor.raw_data == array.astype("<f4").tobytes()
    back = from_tensor(tensor)
    np.testing.assert_array_equal(back, array)
    assert not back.flags.writeable  # a view of the reply's bytes, not a copy
    with pytest.raises(maas.InvalidArgument, match="complex128"):
        to_tensor("input", np.zeros(2, np.complex128))


def test_a_fused_version_hangs_under_each_of_its_parents():
    graph = audit_pb2.LineageGraph(root="models/m/versions/3", nodes=[
        audit_pb2.LineageNode(name="models/m/versions/1", operation="train"),
        audit_pb2.LineageNode(name="models/m/versions/2", operation="train"),
        audit_pb2.LineageNode(name="models/m/versions/3", operation="fuse", job="compressionJobs/f"),
    ], edges=[audit_pb2.LineageEdge(parent="models/m/versions/1", child="models/m/versions/3"),
              audit_pb2.LineageEdge(parent="models/m/versions/2", child="models/m/versions/3")])
    origins = LineageTree.from_graph(graph)
    assert [tree.name for tree in origins] == ["models/m/versions/1", "models/m/versions/2"]
    assert origins[0].render().splitlines() == [
        "models/m/versions/1  (train)",
        "└── models/m/versions/3  (fuse by compressionJobs/f)  ◀"]


def test_a_registry_behind_mutual_tls_is_reached_with_the_clients_tls_arguments(tmp_path):
    certs = make_certificates(tmp_path)
    registry = ServiceProcess("registry", tmp_path / "registry",
                              tls_cert_file=str(certs / "server.pem"),
                              tls_key_file=str(certs / "server.key"),
                              tls_client_ca_file=str(certs / "ca.pem"))
    registry.tls = SuiteTls(certs / "server.pem", certs / "server.key", certs / "ca.pem",
                            mutual=True, client_cert_file=certs / "client.pem",
                            client_key_file=certs / "client.key")
    asyncio.run(registry.start())
    try:
        with maas.Client(target=registry.target, token=registry.admin_token(),
                         ca_file=certs / "ca.pem", cert_file=certs / "client.pem",
                         key_file=certs / "client.key") as client:
            assert client.create_model("over-mtls").name == "models/over-mtls"
        with maas.Client(target=registry.target, token=registry.admin_token(),
                         timeout=5) as plaintext:
            with pytest.raises(maas.Unavailable, match="unreachable over plaintext"):
                plaintext.list_models()
    finally:
        registry.terminate()
