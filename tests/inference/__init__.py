"""Tests of the inference service's Triton layer, against a real tritonserver."""
