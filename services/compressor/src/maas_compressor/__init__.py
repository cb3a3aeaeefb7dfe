"""The MaaS compressor service: compression pipelines run as jobs, measured, gated, registered."""
