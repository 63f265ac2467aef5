"""Engines that host Sparrow: vllm/ is a vLLM plugin (sparrow.integrations.vllm)."""
