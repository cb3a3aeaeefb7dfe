"""Migration scripts, applied in order by `maas_registry.database.migrate`."""
