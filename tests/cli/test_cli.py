"""The `maas` command against the real suite (`maas up`, real Triton): every command family,
`--json` parsed, global options before and after the subcommand, and bad input answered by
one line and an exit code, never a traceback."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from maas_cli.cli_support import hoist_global_options

from tests.support.cli_suite import MAAS, RunningSuite, maas_cli_fixture
from tests.support.processes import free_port

pytestmark = [pytest.mark.triton, pytest.mark.slow]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    running = RunningSuite(tmp_path_factory.mktemp("cli") / "suite").start()
    yield running
    running.stop()


maas = maas_cli_fixture()


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_global_options_are_moved_in_front_of_the_subcommand():
    assert hoist_global_options(["models", "list", "--json", "--token=x", "--target", "h:1"]) == [
        "--json", "--token=x", "--target", "h:1", "models", "list"]
    assert hoist_global_options(["predict", "d", "--", "--json"]) == ["predict", "d", "--", "--json"]


def test_status_with_options_before_or_after_the_subcommand(maas, suite):
    before = maas.json("--json", "--state-dir", str(suite.state_dir), "status")
    after = maas.json("status", "--state-dir", str(suite.state_dir), "--json")
    assert before == after
    assert {row["service"]: row["status"] for row in after} == {
        "registry": "SERVING", "trainer": "SERVING", "compressor": "SERVING",
        "inference": "SERVING", "triton": "READY"}
    assert "triton" in maas("status").stdout


def test_upload_deploy_predict_rollout_and_lineage(maas, tmp_path):
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
            for _ in range(2)]
    rows = torch.randn(4, 64)
    np.save(tmp_path / "rows.npy", rows.numpy())
    for index, net in enumerate(nets):
        torch.jit.trace(net, rows).save(str(tmp_path / f"net{index}.pt"))
    first = maas.json("models", "upload", "cli-net", str(tmp_path / "net0.pt"), "--example",
                      str(tmp_path / "rows.npy"), "--alias", "production", "--json")
    assert first["name"] == "models/cli-net/versions/1" and first["aliases"] == ["production"]
    maas("versions", "upload", "cli-net", str(tmp_path / "net1.pt"), "--example",
         str(tmp_path / "rows.npy"))
    assert [v["name"] for v in maas.json("versions", "list", "cli-net", "--json")] == [
        "models/cli-net/versions/2", "models/cli-net/versions/1"]
    assert maas.json("models", "get", "cli-net", "--json")["latest_version_id"] == "2"

    deployed = maas.json("deploy", "cli-net", "cli-net@production", "--replace", "--json")
    assert deployed["serving_versions"] == ["models/cli-net/versions/1"]
    predicted = maas.json("predict", "cli-net", str(tmp_path / "rows.npy"), "--json")
    np.testing.assert_allclose(predicted["output"]["data"], nets[0](rows).detach().numpy(),
                               atol=1e-5)
    inline = maas.json("--json", "predict", "cli-net",
                       json.dumps({"input": rows[:1].tolist()}))
    assert inline["output"]["shape"] == [1, 10]

    canary = maas.json("rollout", "cli-net", "cli-net/2", "--canary", "10", "--json")
    assert sorted(t["percent"] for t in canary["traffic"]) == [10, 90]
    maas("rollout", "cli-net", "cli-net/2")
    np.save(tmp_path / "one.npy", rows[:2].numpy())
    rolled = maas.json("predict", "cli-net", str(tmp_path / "one.npy"), "--json")
    np.testing.assert_allclose(rolled["output"]["data"], nets[1](rows[:2]).detach().numpy(),
                               atol=1e-5)
    assert [d["name"] for d in maas.json("deployments", "list", "--json")] == [
        "deployments/cli-net"]

    moved = maas.json("alias", "set", "cli-net", "production", "2", "--json")
    assert moved["version"] == "models/cli-net/versions/2"
    downloaded = maas.json("models", "download", "cli-net@production", str(tmp_path), "--json")
    assert open(downloaded["path"], "rb").read() == (tmp_path / "net1.pt").read_bytes()
    tree = maas.json("lineage", "cli-net/2", "--json")
    assert (tree["name"], tree["operation"], tree["focus"]) == (
        "models/cli-net/versions/2", "upload", True)
    assert "models/cli-net/versions/2" in maas("lineage", "cli-net/2").stdout


def test_train_and_compress_with_progress_then_jobs(maas):
    trained = maas("train", "--dataset", "builtin:digits", "--arch", "mlp", "--epochs", "2",
                   "--model", "cli-digits", "--hp", "hidden_sizes=[16]", "--alias", "production")
    assert "succeeded → models/cli-digits/versions/1" in trained.stdout
    compressed = maas.json("compress", "models/cli-digits@production", "--step",
                           "prune:amount=0.5", "--output", "cli-digits-small", "--json")
    assert compressed["state"] == "JOB_STATE_SUCCEEDED"
    assert compressed["model_version"] == "models/cli-digits-small/versions/1"
    listed = maas.json("jobs", "list", "--json")
    assert {job["name"].split("/")[0] for job in listed} == {"trainingJobs", "compressionJobs"}
    refused = maas("jobs", "cancel", compressed["name"], code=1)
    assert "FAILED_PRECONDITION" in one_line_error(refused)
    tree = maas("lineage", "cli-digits-small/1").stdout
    assert tree.index("models/cli-digits/versions/1") < tree.index("cli-digits-small/versions/1")


def test_compress_reads_a_yaml_spec(maas, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("source_model_version: models/cli-spec/versions/9\n"
                    "evaluation_dataset: builtin:digits\nsteps: [\"prune:amount=0.3\"]\n"
                    "output: {model_id: cli-spec-small}\n")
    refused = one_line_error(maas("compress", "--spec", str(spec), code=2))
    assert "source_model_version: models/cli-spec/versions/9 does not exist" in refused


def test_datasets_and_tokens(maas, tmp_path):
    table = tmp_path / "rows.csv"
    table.write_text("a,b,label\n" + "".join(f"{i},{i + 1},{i % 2}\n" for i in range(12)))
    uploaded = maas.json("datasets", "upload", "cli-data", str(table), "--json")
    assert uploaded["row_count"] == "12"
    assert [d["name"] for d in maas.json("datasets", "list", "--json")] == ["datasets/cli-data"]
    assert maas.json("datasets", "get", uploaded["name"], "--json")["schema"]["label_column"] == "label"
    copy = maas.json("datasets", "download", uploaded["name"], str(tmp_path / "copy.csv"), "--json")
    assert open(copy["path"]).read() == table.read_text()

    minted = maas.json("token", "create", "cli-viewer", "--role", "viewer", "--json")
    assert maas.json("--token", minted["token"], "models", "list", "--json") is not None
    denied = maas("--token", minted["token"], "models", "delete", "cli-net", code=3)
    assert "PERMISSION_DENIED" in one_line_error(denied)
    assert "cli-viewer" in [t["principal"] for t in maas.json("token", "list", "--json")]
    assert maas.json("token", "revoke", "cli-viewer", "--json") == {"revoked": 1}


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--token", "wrong", "models", "list"], 3, "UNAUTHENTICATED (INVALID_TOKEN)"),
    (["models", "list", "--target", "127.0.0.1:{free}", "--timeout", "5"], 5, "unreachable"),
    (["predict", "nothing", "/no/such/input.npy"], 4, "no such file: /no/such/input.npy"),
    (["models", "upload", "m", "/no/such/model.onnx"], 4, "no such file"),
    (["predict", "cli-net", '{"input": [[1, 2'], 2, "malformed JSON"),
    (["predict", "cli-net", "[[1, 2], [3]]"], 2, "not a rectangular array"),
    (["predict", "cli-net", "[[1.0, 2.0, 3.0]]"], 2, "inputs[0].shape"),
    (["compress", "cli-net/1", "--step", "shrink:by=2", "--output", "x"], 2, "steps[0]"),
    (["versions", "get", "no-such@production"], 4, "NOT_FOUND"),
    (["modles", "list"], 2, "No such command 'modles'"),
    (["predict", "cli-net"], 2, "Missing argument 'INPUT'"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(maas, args, code, says):
    args = [arg.replace("{free}", str(free_port())) for arg in args]
    line = one_line_error(maas(*args, code=code))
    assert says in line


def test_bad_input_with_json_is_one_json_line(maas):
    failed = maas("--json", "versions", "get", "no-such@production", code=4)
    error = json.loads(one_line_error_json(failed))["error"]
    assert error["code"] == "NOT_FOUND" and "no-such" in error["message"]


def one_line_error_json(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_second_maas_up_on_the_same_state_dir_refuses(suite):
    second = subprocess.run([*MAAS, "--state-dir", str(suite.state_dir), "up"],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"error: FAILED_PRECONDITION: a suite is already running on {suite.state_dir} "
        f"(pid {suite.process.pid}); stop it first (Ctrl-C where it runs) or pass another "
        "--state-dir"]
    assert suite.endpoints  # the running suite is untouched


def test_shell_completion_script_is_offered():
    completion = subprocess.run([*MAAS, "--show-completion", "bash"], capture_output=True,
                                text=True, timeout=60)
    assert completion.returncode == 0 and "_maas_completion" in completion.stdout
