"""The `maas` command-line tool: one-machine suite, demo and token management."""
