"""Drill: two trainer replicas on one PostgreSQL job table and a shared jobs volume; kill -9 of
the replica running a training job, the other takes the job over when its lease lapses and
finishes it from the checkpoint; the killed replica rejoins when restarted."""

from __future__ import annotations

import asyncio
import time

from maas.common.v1 import job_pb2
from maas.registry.v1 import registry_service_pb2 as rs, registry_service_pb2_grpc
from maas.trainer.v1 import trainer_service_pb2_grpc
from maas_runtime.client import open_channel

from tests.support.postgres import postgres_database_or_skip
from tests.support.processes import RegistryProcess, ServiceProcess, process_table
from tests.trainer.helpers import (
    create_job,
    digits_spec,
    get_job,
    job_processes,
    wait_for,
    wait_until_final,
    watch_events,
)

LEASE_SECONDS = 3


def _trainer(root, name: str, registry: RegistryProcess, database_url: str) -> ServiceProcess:
    return ServiceProcess("trainer", root / name, registry_target=registry.target,
                          client_token_file=str(registry.state_dir / "admin.token"),
                          worker_slots="1", schedule_interval_seconds="0.2",
                          watch_poll_seconds="0.2", database_url=database_url,
                          jobs_dir=str(root / "shared-jobs"), replica_id=name,
                          job_lease_seconds=str(LEASE_SECONDS))


async def test_kill_9_of_the_trainer_running_a_job_hands_it_to_the_other_replica(tmp_path):
    with postgres_database_or_skip() as database_url:
        registry = RegistryProcess(tmp_path / "registry")
        await registry.start()
        trainers = {name: _trainer(tmp_path, name, registry, database_url)
                    for name in ("trainer-a", "trainer-b")}
        try:
            for trainer in trainers.values():
                await trainer.start()
            spec = digits_spec(hyperparameters={"hidden_sizes": [64], "dropout": 0.2},
                               epochs=30, batch_size=8, learning_rate=0.003, seed=7,
                               model_id="handed-over")
            channels = {name: open_channel(t.target, token=t.admin_token())
                        for name, t in trainers.items()}
            stubs = {name: trainer_service_pb2_grpc.TrainerServiceStub(channel)
                     for name, channel in channels.items()}
            job = await create_job(stubs["trainer-a"], spec, job_id="handed-over")
            running = await wait_for(stubs["trainer-b"], job.name, lambda j: j.epoch >= 3,
                                     timeout=120)
            assert running.state == job_pb2.JOB_STATE_RUNNING
            # The replica running it is the parent of the job's process (the workdir is shared).
            workdir = str(tmp_path / "shared-jobs" / "handed-over")
            parents = {process_table()[pid].parent for pid in job_processes(workdir)}
            holder = next(name for name, t in trainers.items() if t.process.pid in parents)
            survivor = "trainer-b" if holder == "trainer-a" else "trainer-a"
            killed_at = time.monotonic()
            trainers[holder].kill()
            deadline = time.monotonic() + 10
            while job_processes(workdir) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)

            done = await wait_until_final(stubs[survivor], job.name, timeout=240)
            assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
            assert done.resume_count == 1
            messages = [e.log.message for e in await watch_events(stubs[survivor], job.name)
                        if e.WhichOneof("kind") == "log"]
            assert any(f"replica {holder} stopped renewing its lease; {survivor} resumes" in m
                       for m in messages), messages
            resumed_from = [m for m in messages if m.startswith("resuming after epoch")]
            assert resumed_from and int(resumed_from[0].split()[3]) >= 2, messages
            assert time.monotonic() - killed_at < 240
            async with open_channel(registry.target, token=registry.admin_token()) as channel:
                versions = await registry_service_pb2_grpc.RegistryServiceStub(
                    channel).ListModelVersions(rs.ListModelVersionsRequest(parent="models/handed-over"))
            assert [v.name for v in versions.model_versions] == [done.model_version]

            await trainers[holder].start()  # the killed replica rejoins
            channels[holder] = open_channel(trainers[holder].target,
                                            token=trainers[holder].admin_token())
            rejoined = trainer_service_pb2_grpc.TrainerServiceStub(channels[holder])
            assert (await get_job(rejoined, job.name)).state == job_pb2.JOB_STATE_SUCCEEDED
            second = await create_job(rejoined, digits_spec(epochs=1, model_id="after-rejoin"),
                                      job_id="after-rejoin")
            second = await wait_until_final(rejoined, second.name, timeout=120)
            assert second.state == job_pb2.JOB_STATE_SUCCEEDED, second.error
            for channel in channels.values():
                await channel.close()
        finally:
            for trainer in trainers.values():
                if trainer.process is not None and trainer.process.poll() is None:
                    trainer.terminate()
            registry.terminate()
