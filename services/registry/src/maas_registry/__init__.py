"""MaaS registry service: the system of record for models and datasets."""
