"""Alembic migrations of the usage ledger's table (its own version table, `alembic_version_usage`)."""
