"""Alembic scripts of the job table (`maas_jobs.schema`), applied by `SqlJobStore.open`."""
