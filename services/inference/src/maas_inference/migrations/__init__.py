"""Alembic scripts of the deployment table, applied by `SqlDeploymentStore.open`."""
