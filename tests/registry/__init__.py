"""Registry service tests: domain, store (SQLite and PostgreSQL), gRPC and crash tests."""
