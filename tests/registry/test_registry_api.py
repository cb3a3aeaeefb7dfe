"""The registry over a real gRPC server and stub, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2
from maas.registry.v1 import (
    audit_pb2,
    dataset_pb2,
    model_pb2,
    registry_service_pb2 as rs,
)
from maas_runtime.auth import Role

from tests.registry.helpers import (
    blob_files,
    dataset_upload_requests,
    digits_csv,
    digits_npz,
    digits_signature,
    download,
    mlp_package,
    model_upload_requests,
    sha256,
    staging_files,
)
from tests.support.artifacts import onnx_like
from tests.support.grpc_asserts import expect_error


async def create_model(stub, model_id="digits", **fields):
    return await stub.CreateModel(rs.CreateModelRequest(model_id=model_id,
                                                        model=model_pb2.Model(**fields)))


async def test_model_crud_with_etag(registry):
    stub = registry.admin
    model = await create_model(stub, display_name="Digits", labels={"team": "vision"})
    assert model.name == "models/digits" and model.etag
    await expect_error(create_model(stub), grpc.StatusCode.ALREADY_EXISTS)
    assert (await stub.GetModel(rs.GetModelRequest(name="models/digits"))).display_name == "Digits"
    updated = await stub.UpdateModel(rs.UpdateModelRequest(
        model=model_pb2.Model(name="models/digits", description="8x8", etag=model.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["description"])))
    assert updated.description == "8x8" and updated.display_name == "Digits"
    await expect_error(stub.UpdateModel(rs.UpdateModelRequest(
        model=model_pb2.Model(name="models/digits", description="lost", etag=model.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["description"]))), grpc.StatusCode.ABORTED)
    await expect_error(stub.UpdateModel(rs.UpdateModelRequest(
        model=model_pb2.Model(name="models/digits"),
        update_mask=field_mask_pb2.FieldMask(paths=["latest_version_id"]))),
        grpc.StatusCode.INVALID_ARGUMENT, "update_mask")
    await stub.DeleteModel(rs.DeleteModelRequest(name="models/digits"))
    await expect_error(stub.GetModel(rs.GetModelRequest(name="models/digits")),
                       grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("model_id", ["", "..", "a/b", "-x", "x" * 64, "a..b", "Caps", "nl\n"])
async def test_bad_model_ids(registry, model_id):
    await expect_error(create_model(registry.admin, model_id), grpc.StatusCode.INVALID_ARGUMENT,
                       "model_id")


@pytest.mark.parametrize("name", ["models/../x", "models/a/b", "model/x", "models/"])
async def test_bad_names(registry, name):
    await expect_error(registry.admin.GetModel(rs.GetModelRequest(name=name)),
                       grpc.StatusCode.INVALID_ARGUMENT, "name")


@pytest.mark.parametrize("name", ["models/x/versions/\u00b2", "models/x/versions/0",
                                  "models/x/versions/99999999999999999999", "models/x@7up"])
async def test_bad_version_names(registry, name):
    await expect_error(registry.admin.GetModelVersion(rs.GetModelVersionRequest(name=name)),
                       grpc.StatusCode.INVALID_ARGUMENT, "name")


async def test_unknown_enum_values_are_invalid_arguments(registry):
    await create_model(registry.admin)
    await registry.admin.UploadModelVersion(model_upload_requests("models/digits", mlp_package()))
    await expect_error(registry.admin.GetLineage(rs.GetLineageRequest(
        name="models/digits/versions/1", direction=7)), grpc.StatusCode.INVALID_ARGUMENT,
        "direction")
    call = registry.admin.WatchEvents(rs.WatchEventsRequest(types=[42]))
    await expect_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "types")


async def test_upload_download_resume_and_dedup(registry):
    stub = registry.admin
    await create_model(stub)
    data = mlp_package()
    version = await stub.UploadModelVersion(model_upload_requests(
        "models/digits", data, metrics={"accuracy": 0.97}, labels={"task": "digits"}))
    assert version.name == "models/digits/versions/1"
    assert version.artifact.sha256 == sha256(data) and version.artifact.size_bytes == len(data)
    assert version.signature.inputs[0].name == "input"  # taken from the manifest
    assert list(version.signature.inputs[0].shape) == [64]
    header, body = await download(stub.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name="models/digits/versions/1")))
    assert body == data and header.artifact.sha256 == sha256(data)
    _, tail = await download(stub.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name="models/digits/versions/1", offset=1000)))
    assert tail == data[1000:]
    await expect_error(download(stub.DownloadModelVersion(rs.DownloadModelVersionRequest(
        name="models/digits/versions/1", offset=len(data) + 1))), grpc.StatusCode.OUT_OF_RANGE)
    second = await stub.UploadModelVersion(model_upload_requests("models/digits", data))
    assert second.version_id == 2
    assert len(blob_files(registry.settings.state_dir)) == 1, "same bytes share one blob"
    await stub.DeleteModelVersion(rs.DeleteModelVersionRequest(name="models/digits/versions/1"))
    assert len(blob_files(registry.settings.state_dir)) == 1, "still referenced by v2"
    await stub.DeleteModelVersion(rs.DeleteModelVersionRequest(name="models/digits/versions/2"))
    assert blob_files(registry.settings.state_dir) == []


def _stream(*messages):
    async def generate():
        for message in messages:
            yield message
    return generate()


def _corrupt_header(data: bytes) -> bytes:
    return (len(data)).to_bytes(8, "little") + data[8:]  # header length beyond the file


def _disagreeing_manifest() -> bytes:
    import json

    import numpy as np
    from safetensors.numpy import save

    tensors = {"w": np.zeros((2, 2), np.float32)}
    manifest = {"format_version": 1, "architecture": {"kind": "mlp", "hyperparameters": {}},
                "signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}],
                              "outputs": [{"name": "y", "datatype": "FP32", "shape": [2]}]},
                "tensors": {"w": {"dtype": "F32", "shape": [3, 2]}}}
    return save(tensors, metadata={"maas.manifest": json.dumps(manifest)})


@pytest.mark.parametrize("case", ["digest", "truncated", "corrupt", "manifest", "format"])
async def test_bad_uploads_store_nothing(registry, case):
    stub = registry.admin
    await create_model(stub)
    data = mlp_package()
    requests, field = {
        "digest": (model_upload_requests("models/digits", data, expected="0" * 64),
                   "header.expected_sha256"),
        "truncated": (model_upload_requests("models/digits", data[:-100], expected="",
                                            size=len(data)), "header.size_bytes"),
        "corrupt": (model_upload_requests("models/digits", _corrupt_header(data)), None),
        "manifest": (model_upload_requests("models/digits", _disagreeing_manifest()), None),
        "format": (model_upload_requests("models/digits", data,
                                         fmt=model_pb2.MODEL_FORMAT_UNSPECIFIED),
                   "header.model_version.format"),
    }[case]
    await expect_error(stub.UploadModelVersion(requests), grpc.StatusCode.INVALID_ARGUMENT, field)
    listed = await stub.ListModelVersions(rs.ListModelVersionsRequest(parent="models/digits"))
    assert list(listed.model_versions) == []
    assert blob_files(registry.settings.state_dir) == []
    assert staging_files(registry.settings.state_dir) == []


async def test_stream_protocol_violations(registry):
    stub = registry.admin
    await create_model(stub)
    chunk = rs.UploadModelVersionRequest(chunk=b"abc")
    header = next(model_upload_requests("models/digits", b"abc"))
    await expect_error(stub.UploadModelVersion(_stream(chunk, header)),
                       grpc.StatusCode.INVALID_ARGUMENT, "header")
    await expect_error(stub.UploadModelVersion(_stream(header, chunk, header)),
                       grpc.StatusCode.INVALID_ARGUMENT, "header")
    assert blob_files(registry.settings.state_dir) == []
    assert staging_files(registry.settings.state_dir) == []


async def test_upload_over_the_limit_is_resource_exhausted(registry):
    stub = registry.admin
    await create_model(stub)
    limit = registry.settings.max_artifact_bytes
    # A declared size over the limit is refused from the header alone, before any bytes.
    await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/digits", b"x", expected="", size=limit + 1)),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "header.size_bytes")
    # An undeclared size is counted while streaming; the byte past the limit is refused.
    # (The last chunk is the one byte too many, so the client has finished writing when the
    # server answers: grpc-core reports a write racing a server's early status as INTERNAL.)
    big = b"\0" * (limit + 1)
    await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/digits", big, chunk=limit, expected="", size=0)),
        grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert blob_files(registry.settings.state_dir) == []
    assert staging_files(registry.settings.state_dir) == []


async def test_upload_to_a_missing_model_creates_it_unless_asked_not_to(registry):
    stub = registry.admin
    await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/ghost", mlp_package(), require_existing_model=True)), grpc.StatusCode.NOT_FOUND)
    await expect_error(stub.GetModel(rs.GetModelRequest(name="models/ghost")),
                       grpc.StatusCode.NOT_FOUND)

    version = await stub.UploadModelVersion(model_upload_requests("models/fresh", mlp_package()))
    assert version.name == "models/fresh/versions/1"
    model = await stub.GetModel(rs.GetModelRequest(name="models/fresh"))
    assert model.name == "models/fresh"
    audit = await stub.ListAuditEvents(rs.ListAuditEventsRequest(page_size=1000))
    assert [(e.method, e.resource) for e in audit.audit_events] == [
        ("UploadModelVersion", "models/fresh"), ("UploadModelVersion", "models/fresh/versions/1")]
    call = stub.WatchEvents(rs.WatchEventsRequest())
    created, uploaded = await call.read(), await call.read()
    call.cancel()
    assert [(created.type, created.resource), (uploaded.type, uploaded.resource)] == [
        (audit_pb2.EVENT_TYPE_MODEL_CREATED, "models/fresh"),
        (audit_pb2.EVENT_TYPE_MODEL_VERSION_CREATED, "models/fresh/versions/1")]
    # The model exists now: the next upload (existing model required) just adds a version.
    second = await stub.UploadModelVersion(model_upload_requests(
        "models/fresh", mlp_package(2), require_existing_model=True))
    assert second.name == "models/fresh/versions/2"


async def test_a_refused_upload_to_a_missing_model_writes_nothing(registry):
    stub = registry.admin
    await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/ghost", b"not a package")), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/ghost", onnx_like(b"graph"), fmt=model_pb2.MODEL_FORMAT_ONNX)),
        grpc.StatusCode.INVALID_ARGUMENT, "header.model_version.signature")
    await expect_error(stub.GetModel(rs.GetModelRequest(name="models/ghost")),
                       grpc.StatusCode.NOT_FOUND)
    assert list((await stub.ListAuditEvents(rs.ListAuditEventsRequest())).audit_events) == []
    assert blob_files(registry.settings.state_dir) == []
    assert staging_files(registry.settings.state_dir) == []


@pytest.mark.parametrize("fmt", [model_pb2.MODEL_FORMAT_ONNX, model_pb2.MODEL_FORMAT_TORCHSCRIPT])
async def test_formats_served_by_signature_need_one_at_upload(registry, fmt):
    stub = registry.admin
    await create_model(stub)
    refused = await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/digits", onnx_like(b"graph"), fmt=fmt)),
        grpc.StatusCode.INVALID_ARGUMENT, "header.model_version.signature")
    assert model_pb2.ModelFormat.Name(fmt) in refused.details()
    half = digits_signature()
    del half.outputs[:]
    await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/digits", onnx_like(b"graph"), fmt=fmt, signature=half)),
        grpc.StatusCode.INVALID_ARGUMENT, "header.model_version.signature")
    assert blob_files(registry.settings.state_dir) == []


async def test_an_onnx_upload_with_a_signature_is_stored_and_a_package_needs_none(registry):
    stub = registry.admin
    await create_model(stub)
    onnx = await stub.UploadModelVersion(model_upload_requests(
        "models/digits", onnx_like(b"graph"), fmt=model_pb2.MODEL_FORMAT_ONNX,
        signature=digits_signature()))
    assert onnx.signature == digits_signature()
    package = await stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package()))
    assert package.signature.inputs[0].name == "input"  # from the manifest


@pytest.mark.parametrize(("declared", "data", "actual"), [
    (model_pb2.MODEL_FORMAT_ONNX, mlp_package(), "MODEL_FORMAT_MAAS_PACKAGE"),
    (model_pb2.MODEL_FORMAT_MAAS_PACKAGE, onnx_like(b"graph"), "MODEL_FORMAT_ONNX"),
])
async def test_bytes_of_another_format_than_declared_are_refused_naming_both(
        registry, declared, data, actual):
    stub = registry.admin
    await create_model(stub)
    refused = await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/digits", data, fmt=declared, signature=digits_signature())),
        grpc.StatusCode.INVALID_ARGUMENT, "header.model_version.format")
    assert model_pb2.ModelFormat.Name(declared) in refused.details()
    assert actual in refused.details()
    assert blob_files(registry.settings.state_dir) == []
    listed = await stub.ListModelVersions(rs.ListModelVersionsRequest(parent="models/digits"))
    assert list(listed.model_versions) == []


async def test_aliases_resolve_move_atomically_and_guard_deletion(registry):
    stub = registry.admin
    await create_model(stub)
    for seed in (1, 2):
        await stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package(seed)))
    alias = await stub.SetModelAlias(rs.SetModelAliasRequest(
        name="models/digits/aliases/production", version="models/digits/versions/1",
        expected_version=""))
    assert alias.version == "models/digits/versions/1"
    resolved = await stub.GetModelVersion(rs.GetModelVersionRequest(name="models/digits@production"))
    assert resolved.version_id == 1 and list(resolved.aliases) == ["production"]
    header, body = await download(stub.DownloadModelVersion(
        rs.DownloadModelVersionRequest(name="models/digits@production")))
    assert body == mlp_package(1)
    await expect_error(stub.SetModelAlias(rs.SetModelAliasRequest(
        name="models/digits/aliases/production", version="models/digits/versions/2",
        expected_version="models/digits/versions/2")), grpc.StatusCode.ABORTED)
    moved = await stub.SetModelAlias(rs.SetModelAliasRequest(
        name="models/digits/aliases/production", version="models/digits/versions/2",
        expected_version="models/digits/versions/1"))
    assert moved.version.endswith("/2")
    model = await stub.GetModel(rs.GetModelRequest(name="models/digits"))
    assert dict(model.aliases) == {"production": 2}
    await expect_error(stub.DeleteModelVersion(rs.DeleteModelVersionRequest(
        name="models/digits/versions/2")), grpc.StatusCode.FAILED_PRECONDITION)
    editor = registry.as_role("ed", Role.EDITOR)
    await expect_error(editor.DeleteModelVersion(rs.DeleteModelVersionRequest(
        name="models/digits/versions/2", force=True)), grpc.StatusCode.PERMISSION_DENIED)
    await stub.DeleteModelVersion(rs.DeleteModelVersionRequest(
        name="models/digits/versions/2", force=True))
    await expect_error(stub.GetModelVersion(rs.GetModelVersionRequest(
        name="models/digits@production")), grpc.StatusCode.NOT_FOUND)
    await expect_error(stub.SetModelAlias(rs.SetModelAliasRequest(
        name="models/digits/aliases/7up", version="models/digits/versions/1")),
        grpc.StatusCode.INVALID_ARGUMENT, "name")


async def test_concurrent_alias_moves_with_compare_and_set_have_one_winner(registry):
    stub = registry.admin
    await create_model(stub)
    for seed in (1, 2, 3):
        await stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package(seed)))
    await stub.SetModelAlias(rs.SetModelAliasRequest(
        name="models/digits/aliases/prod", version="models/digits/versions/1"))
    results = await asyncio.gather(*(stub.SetModelAlias(rs.SetModelAliasRequest(
        name="models/digits/aliases/prod", version=f"models/digits/versions/{v}",
        expected_version="models/digits/versions/1")) for v in (2, 3)), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].code() == grpc.StatusCode.ABORTED


async def test_list_filter_and_tamper_proof_pagination(registry):
    stub = registry.admin
    await create_model(stub)
    accuracies = [0.90, 0.96, 0.99, 0.97, 0.93]
    for index, accuracy in enumerate(accuracies):
        await stub.UploadModelVersion(model_upload_requests(
            "models/digits", mlp_package(index), metrics={"accuracy": accuracy},
            labels={"task": "digits" if index % 2 == 0 else "other"}))
    listed = await stub.ListModelVersions(rs.ListModelVersionsRequest(
        parent="models/digits", filter='metrics.accuracy > 0.95 AND labels.task = "digits"'))
    assert [v.version_id for v in listed.model_versions] == [3]
    seen, token = [], ""
    while True:
        page = await stub.ListModelVersions(rs.ListModelVersionsRequest(
            parent="models/digits", page_size=2, page_token=token))
        seen += [v.version_id for v in page.model_versions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]
    first = await stub.ListModelVersions(rs.ListModelVersionsRequest(parent="models/digits",
                                                                     page_size=2))
    tampered = first.next_page_token[:-3] + ("AAA" if first.next_page_token[-3:] != "AAA"
                                             else "BBB")
    await expect_error(stub.ListModelVersions(rs.ListModelVersionsRequest(
        parent="models/digits", page_size=2, page_token=tampered)),
        grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    await expect_error(stub.ListModelVersions(rs.ListModelVersionsRequest(
        parent="models/digits", page_size=2, page_token=first.next_page_token,
        filter='labels.task = "digits"')), grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    await expect_error(stub.ListModelVersions(rs.ListModelVersionsRequest(
        parent="models/digits", filter="colour = 3")), grpc.StatusCode.INVALID_ARGUMENT, "filter")


async def test_datasets_lineage_and_audit(registry):
    stub = registry.admin
    await stub.CreateDataset(rs.CreateDatasetRequest(dataset_id="digits",
                                                     dataset=dataset_pb2.Dataset()))
    npz = await stub.UploadDatasetVersion(dataset_upload_requests(
        "datasets/digits", digits_npz(40), dataset_pb2.DATASET_FORMAT_NPZ, ["features"],
        "labels"))
    assert npz.row_count == 40 and list(npz.schema.feature_shape) == [64]
    csv = await stub.UploadDatasetVersion(dataset_upload_requests(
        "datasets/digits", digits_csv(30), dataset_pb2.DATASET_FORMAT_CSV, ["f0", "f1", "f2"],
        "label"))
    assert csv.row_count == 30 and csv.schema.num_classes == 4
    await expect_error(stub.UploadDatasetVersion(dataset_upload_requests(
        "datasets/digits", digits_csv(5), dataset_pb2.DATASET_FORMAT_CSV, ["f0", "nope"],
        "label")), grpc.StatusCode.INVALID_ARGUMENT)
    _, body = await download(stub.DownloadDatasetVersion(
        rs.DownloadDatasetVersionRequest(name="datasets/digits/versions/1")))
    assert body == digits_npz(40)

    await create_model(stub, "digits")
    await create_model(stub, "digits-small")
    await stub.UploadModelVersion(model_upload_requests(
        "models/digits", mlp_package(), parents=["datasets/digits/versions/1"],
        operation="train"))
    await stub.UploadModelVersion(model_upload_requests(
        "models/digits-small", mlp_package(3, hidden=8), parents=["models/digits/versions/1"],
        operation="prune"))
    await expect_error(stub.UploadModelVersion(model_upload_requests(
        "models/digits", mlp_package(), parents=["models/digits/versions/99"])),
        grpc.StatusCode.INVALID_ARGUMENT, "header.model_version.lineage.parents[0]")
    graph = await stub.GetLineage(rs.GetLineageRequest(name="models/digits/versions/1"))
    assert {(e.parent, e.child) for e in graph.edges} == {
        ("datasets/digits/versions/1", "models/digits/versions/1"),
        ("models/digits/versions/1", "models/digits-small/versions/1")}
    operations = {n.name: n.operation for n in graph.nodes}
    assert operations["models/digits-small/versions/1"] == "prune"
    ancestors = await stub.GetLineage(rs.GetLineageRequest(
        name="models/digits-small/versions/1", direction=rs.LINEAGE_DIRECTION_ANCESTORS))
    assert {n.name for n in ancestors.nodes} == {
        "datasets/digits/versions/1", "models/digits/versions/1",
        "models/digits-small/versions/1"}

    audit = await stub.ListAuditEvents(rs.ListAuditEventsRequest(
        filter='resource = "models/digits-small/versions/1"'))
    assert [(e.method, e.principal) for e in audit.audit_events] == [("UploadModelVersion",
                                                                      "admin")]
    assert audit.audit_events[0].after["artifact"]["sha256"]
    everything = await stub.ListAuditEvents(rs.ListAuditEventsRequest(page_size=1000))
    assert [e.method for e in everything.audit_events] == [
        "CreateDataset", "UploadDatasetVersion", "UploadDatasetVersion", "CreateModel",
        "CreateModel", "UploadModelVersion", "UploadModelVersion"]


async def test_alias_move_audited_with_before_and_after(registry):
    stub = registry.admin
    await create_model(stub)
    for seed in (1, 2):
        await stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package(seed)))
    alice = registry.as_role("alice", Role.EDITOR)
    for version in (1, 2):
        await alice.SetModelAlias(rs.SetModelAliasRequest(
            name="models/digits/aliases/production",
            version=f"models/digits/versions/{version}"))
    events = (await stub.ListAuditEvents(rs.ListAuditEventsRequest(
        filter='resource = "models/digits/aliases/production" AND principal = "alice"'))
    ).audit_events
    assert [e.after["version"] for e in events] == ["models/digits/versions/1",
                                                   "models/digits/versions/2"]
    assert events[1].before["version"] == "models/digits/versions/1"


async def test_watch_events_replays_then_streams_live_and_resumes(registry):
    stub = registry.admin
    await create_model(stub)
    await stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package()))
    call = stub.WatchEvents(rs.WatchEventsRequest())
    replayed = [await call.read(), await call.read()]
    assert [e.type for e in replayed] == [audit_pb2.EVENT_TYPE_MODEL_CREATED,
                                          audit_pb2.EVENT_TYPE_MODEL_VERSION_CREATED]
    assert replayed[1].model_version.artifact.sha256 == sha256(mlp_package())
    await stub.SetModelAlias(rs.SetModelAliasRequest(name="models/digits/aliases/prod",
                                                     version="models/digits/versions/1"))
    live = await asyncio.wait_for(call.read(), 5)
    assert live.type == audit_pb2.EVENT_TYPE_ALIAS_MOVED
    assert live.alias.version == "models/digits/versions/1"
    call.cancel()
    # A reconnecting watcher resumes after the last id it saw and misses nothing.
    await stub.DeleteModelAlias(rs.DeleteModelAliasRequest(name="models/digits/aliases/prod"))
    resumed = stub.WatchEvents(rs.WatchEventsRequest(after_event_id=live.event_id))
    after = await asyncio.wait_for(resumed.read(), 5)
    assert after.type == audit_pb2.EVENT_TYPE_ALIAS_DELETED and after.event_id > live.event_id
    resumed.cancel()
    filtered = stub.WatchEvents(rs.WatchEventsRequest(
        types=[audit_pb2.EVENT_TYPE_ALIAS_MOVED]))
    assert (await asyncio.wait_for(filtered.read(), 5)).event_id == live.event_id
    filtered.cancel()


async def test_viewer_reads_scoped_tokens_are_confined(registry):
    stub = registry.admin
    await create_model(stub, "digits")
    await create_model(stub, "secret")
    viewer = registry.as_role("val", Role.VIEWER)
    await viewer.GetModel(rs.GetModelRequest(name="models/digits"))
    await expect_error(create_model(viewer, "x"), grpc.StatusCode.PERMISSION_DENIED)
    scoped = registry.as_role("team", Role.EDITOR, models=["digits*"])
    await scoped.GetModel(rs.GetModelRequest(name="models/digits"))
    await expect_error(scoped.GetModel(rs.GetModelRequest(name="models/secret")),
                       grpc.StatusCode.PERMISSION_DENIED)
    listed = await scoped.ListModels(rs.ListModelsRequest())
    assert [m.name for m in listed.models] == ["models/digits"]


async def test_client_cancelling_mid_upload_leaves_nothing(registry):
    stub = registry.admin
    await create_model(stub)
    data = mlp_package() * 40
    sent = asyncio.Event()

    async def slow_requests():
        for index, request in enumerate(model_upload_requests("models/digits", data,
                                                              chunk=16 * 1024)):
            yield request
            if index == 3:
                sent.set()
                await asyncio.sleep(30)  # never finishes: the client cancels first

    call = stub.UploadModelVersion(slow_requests())
    await sent.wait()
    await asyncio.sleep(0.2)
    assert len(staging_files(registry.settings.state_dir)) == 1, "the upload is in progress"
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(50):  # the server notices the cancellation asynchronously
        if not staging_files(registry.settings.state_dir):
            break
        await asyncio.sleep(0.05)
    listed = await stub.ListModelVersions(rs.ListModelVersionsRequest(parent="models/digits"))
    assert list(listed.model_versions) == []
    assert blob_files(registry.settings.state_dir) == []
    assert staging_files(registry.settings.state_dir) == []


async def test_force_deleting_a_model_tells_watchers_about_its_aliases_and_versions(registry):
    stub = registry.admin
    await create_model(stub)
    await stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package()))
    await stub.SetModelAlias(rs.SetModelAliasRequest(name="models/digits/aliases/prod",
                                                     version="models/digits/versions/1"))
    last = (await stub.ListAuditEvents(rs.ListAuditEventsRequest())).audit_events[-1]
    await expect_error(stub.DeleteModel(rs.DeleteModelRequest(name="models/digits")),
                       grpc.StatusCode.FAILED_PRECONDITION)
    await stub.DeleteModel(rs.DeleteModelRequest(name="models/digits", force=True))
    call = stub.WatchEvents(rs.WatchEventsRequest(after_event_id=last.event_id))
    seen = [(await asyncio.wait_for(call.read(), 5)) for _ in range(3)]
    call.cancel()
    assert [(e.type, e.resource) for e in seen] == [
        (audit_pb2.EVENT_TYPE_ALIAS_DELETED, "models/digits/aliases/prod"),
        (audit_pb2.EVENT_TYPE_MODEL_VERSION_DELETED, "models/digits/versions/1"),
        (audit_pb2.EVENT_TYPE_MODEL_DELETED, "models/digits")]
    assert blob_files(registry.settings.state_dir) == []


async def test_scoped_tokens_see_only_their_models_in_events_audit_and_lineage(registry):
    stub = registry.admin
    for model_id in ("digits", "secret"):
        await create_model(stub, model_id)
    await stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package()))
    await stub.UploadModelVersion(model_upload_requests(
        "models/secret", mlp_package(2), parents=["models/digits/versions/1"]))
    scoped = registry.as_role("team", Role.VIEWER, models=["digits"])
    audit = await scoped.ListAuditEvents(rs.ListAuditEventsRequest())
    assert {e.resource.split("/")[1] for e in audit.audit_events} == {"digits"}
    call = scoped.WatchEvents(rs.WatchEventsRequest())
    first, second = await call.read(), await call.read()
    call.cancel()
    assert [first.resource, second.resource] == ["models/digits", "models/digits/versions/1"]
    graph = await scoped.GetLineage(rs.GetLineageRequest(name="models/digits/versions/1"))
    assert [n.name for n in graph.nodes] == ["models/digits/versions/1"]
    assert list(graph.edges) == []


async def test_a_scoped_token_reads_neither_versions_nor_aliases_of_other_models(registry):
    stub = registry.admin
    for model_id in ("digits", "mnist-a", "secret"):
        await create_model(stub, model_id)
    await stub.UploadModelVersion(model_upload_requests("models/secret", mlp_package()))
    await stub.SetModelAlias(rs.SetModelAliasRequest(name="models/secret/aliases/prod",
                                                     version="models/secret/versions/1"))
    scoped = registry.as_role("team", Role.VIEWER, models=["digits", "mnist-*"])
    for name in ("models/secret/versions/1", "models/secret@prod"):
        refused = await expect_error(scoped.GetModelVersion(rs.GetModelVersionRequest(name=name)),
                                     grpc.StatusCode.PERMISSION_DENIED)
        assert "not scoped to model 'secret'" in refused.details()
    listed = await scoped.ListModels(rs.ListModelsRequest())
    assert [m.name for m in listed.models] == ["models/digits", "models/mnist-a"]
