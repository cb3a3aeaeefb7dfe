"""Trainer tests: job machinery units, and the trainer over real gRPC against a real registry."""
