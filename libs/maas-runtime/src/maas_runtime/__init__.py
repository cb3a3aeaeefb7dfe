"""Shared gRPC server runtime for the MaaS services."""
