"""MaaS inference service: registry versions served by Triton, with canary and shadow traffic."""
