"""Migration scripts of the deployment table, applied in order."""
