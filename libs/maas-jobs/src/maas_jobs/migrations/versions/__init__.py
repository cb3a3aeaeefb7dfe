"""Migration scripts of the job table, applied in order."""
