"""`maas.Client` against the real suite (`maas up`, real Triton): the lifecycle in a few lines
each, and every failure as a typed exception carrying the status details."""

from __future__ import annotations

import subprocess
import sys
import time

import maas
import numpy as np
import pytest
import torch

from tests.support.processes import free_port

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def small_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


def test_import_maas_gives_the_client_and_keeps_the_generated_stubs_importable():
    code = ("import maas, maas.registry.v1.registry_service_pb2 as rs, "
            "maas.inference.v1.inference_service_pb2 as inf; "
            "print(maas.Client.__name__, maas.NotFound.__name__, rs.GetModelRequest.__name__, "
            "inf.PredictRequest.__name__)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()
    assert shown == ["Client", "NotFound", "GetModelRequest", "PredictRequest"]


def test_an_uploaded_module_is_served_predicts_like_torch_and_rolls_out_to_another(client):
    first, second = small_net(0), small_net(1)
    rows = torch.randn(8, 64)
    version = client.upload_module("sdk-net", first, rows, alias="production")
    assert version.name == "models/sdk-net/versions/1"
    assert [spec.name for spec in version.signature.inputs] == ["input"]
    assert list(version.signature.inputs[0].shape) == [64]

    deployment = client.deploy("sdk-net", "sdk-net@production", replace=True)
    assert list(deployment.serving_versions) == ["models/sdk-net/versions/1"]
    outputs = client.predict("sdk-net", rows.numpy())
    np.testing.assert_allclose(outputs["output"], first(rows).detach().numpy(), atol=1e-5)

    onnx_version = client.upload_module("sdk-net", second, rows, format="onnx")
    client.rollout("sdk-net", onnx_version.name)
    rolled = client.predict("sdk-net", {"input": rows.numpy()})
    np.testing.assert_allclose(rolled["output"], second(rows).detach().numpy(), atol=1e-4)

    split = client.split_traffic("sdk-net", {"sdk-net/1": 90, onnx_version.name: 10})
    assert sorted(t.percent for t in split.traffic) == [10, 90]
    shadowed = client.shadow("sdk-net", "sdk-net/1", 50)
    assert shadowed.shadow.model_version == "models/sdk-net/versions/1"


def test_training_and_compression_report_progress_and_leave_a_lineage_tree(client):
    events: list[maas.JobProgress] = []
    job = client.train(dataset="builtin:digits", arch="mlp", epochs=2, model="sdk-digits",
                       hyperparameters={"hidden_sizes": [16]}, alias="production")
    trained = client.wait(job, events.append)
    assert trained.model_version == "models/sdk-digits/versions/1"
    assert [e.epoch for e in events if e.kind == "metrics" and e.phase == "train"] == [1, 2]
    assert events[-1].state == "SUCCEEDED" and events[-1].total_epochs == 2

    steps: list[maas.JobProgress] = []
    compressed = client.wait(client.compress("sdk-digits@production", ["prune:amount=0.5"],
                                             output="sdk-digits-small"), steps.append)
    assert compressed.model_version == "models/sdk-digits-small/versions/1"
    assert any(e.kind == "state_change" and e.state == "RUNNING" for e in steps)

    tree = client.lineage("sdk-digits-small/1")
    assert tree.name == "models/sdk-digits/versions/1" and tree.operation == "train"
    assert [child.name for child in tree.children] == ["models/sdk-digits-small/versions/1"]
    assert tree.children[0].focus and tree.children[0].operation == "prune"
    assert tree.render().splitlines()[1].startswith("└── models/sdk-digits-small/versions/1")
    assert [t.name for t in client.list_jobs()] == [job.name, compressed.name]


def test_datasets_upload_from_arrays_and_csv_and_download_verified(client, tmp_path):
    features = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    labels = np.arange(40) % 10
    version = client.upload_dataset("sdk-data", features, labels=labels)
    assert (version.row_count, list(version.schema.feature_shape)) == (40, [64])
    table = tmp_path / "rows.csv"
    table.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(20)))
    from_csv = client.upload_dataset("sdk-data", table)
    assert from_csv.name == "datasets/sdk-data/versions/2" and from_csv.row_count == 20
    downloaded = client.download(from_csv.name, tmp_path / "copy.csv")
    assert downloaded.read_bytes() == table.read_bytes()
    assert sorted(d.name for d in client.list_dataset_versions("sdk-data")) == [
        "datasets/sdk-data/versions/1", "datasets/sdk-data/versions/2"]


def test_failures_are_typed_exceptions_with_the_status_details(client, suite, tmp_path):
    with pytest.raises(maas.NotFound) as unknown:
        client.get_version("no-such-model@production")
    assert "no-such-model" in unknown.value.message

    with maas.Client(state_dir=suite.state_dir, token="not-a-token") as stranger:
        with pytest.raises(maas.Unauthenticated) as refused:
            stranger.list_models()
    assert refused.value.reason == "INVALID_TOKEN"

    with maas.Client(target=f"127.0.0.1:{free_port()}", token="t", timeout=5) as nowhere:
        with pytest.raises(maas.Unavailable, match="unreachable over plaintext"):
            nowhere.list_models()

    client.upload_module("sdk-shape", small_net(2), torch.randn(2, 64))
    client.deploy("sdk-shape", "sdk-shape/1", replace=True)
    with pytest.raises(maas.InvalidArgument) as bad_shape:
        client.predict("sdk-shape", np.zeros((2, 63), np.float32))
    assert [v.field for v in bad_shape.value.field_violations] == ["inputs[0].shape"]

    with pytest.raises(FileNotFoundError):
        client.upload_model("sdk-shape", tmp_path / "missing.onnx")
    with pytest.raises(maas.InvalidArgument) as bad_step:
        client.compress("sdk-shape/1", ["shrink:amount=2"], output="x")
    assert bad_step.value.field_violations[0].field == "steps[0]"


def test_tokens_minted_by_the_client_authenticate_with_their_role_until_revoked(client, suite):
    viewer_token = client.create_token("sdk-viewer", "viewer")
    assert "sdk-viewer" in [t.principal for t in client.list_tokens()]
    with maas.Client(state_dir=suite.state_dir, token=viewer_token) as viewer:
        viewer.list_models()
        with pytest.raises(maas.PermissionDenied):
            viewer.create_model("viewer-may-not")
        assert client.revoke_token("sdk-viewer") == 1
        deadline = time.monotonic() + 5  # the services re-read the tokens file within a second
        with pytest.raises(maas.Unauthenticated):
            while time.monotonic() < deadline:
                viewer.list_models()
                time.sleep(0.2)


def test_status_reports_every_service_and_triton(client):
    report = {status.name: status.status for status in client.status()}
    assert report == {"registry": "SERVING", "trainer": "SERVING", "compressor": "SERVING",
                      "inference": "SERVING", "triton": "READY"}
