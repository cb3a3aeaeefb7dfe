"""End-to-end tests against the running suite (`maas up` as the user runs it)."""
