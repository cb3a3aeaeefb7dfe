"""Job machinery shared by the trainer and the compressor.

- `records`: job states, records and events (no storage, no transport);
- `store`: the job table and per-job event log (SQLAlchemy Core, SQLite WAL);
- `scheduler`: fair share of a pool of worker slots between tenants;
- `executor`: one OS process (group) per job, its progress forwarded;
- `kubernetes_executor`: each job as a Kubernetes Job (Indexed for torchrun workers) or a
  Kubeflow PyTorchJob, selected by `job_executor`;
- `progress`: the line protocol a job process speaks, and its parent-death watch;
- `entry`: around a job process's work: its failure reported, a fast exit;
- `manager`: submit, schedule, run, cancel, watch and recover, around a service's `JobRunner`;
- `resources`: jobs and events in the contract's JSON shape, for servicers;
- `settings`: the settings fields every job service adds to `ServiceSettings`;
- `service`: the composition root every job service shares (store, registry, manager, server);
- `scoped`: get, list, cancel and watch of a service's jobs within the caller's model scopes;
- `servicer`: job and event messages, and the Get/List/Cancel/Watch RPC bodies.

Import from the submodules. Nothing is re-exported here on purpose: a job process imports
`maas_jobs.progress` at every start, and must not pay for SQLAlchemy and the manager.
"""
