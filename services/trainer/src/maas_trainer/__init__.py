"""The MaaS trainer: fair-share training jobs with streamed progress, checkpoints and DDP.

`server` composes the service; `servicer` adapts gRPC; `jobs` holds the use cases, `spec`
and `validation` the request checks, `runner` the glue to `maas_jobs`
(registry calls go through `maas_runtime.registry_client`). `job_process` and `training` run
inside each job's own process.
"""
