"""Tests of maas-llm: GGUF headers, causal-LM directories, prompts, sampling and the engine."""
