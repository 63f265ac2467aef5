"""Sparrow inside vLLM: a general plugin (entry point `vllm.general_plugins`, loaded by every vLLM
process) that registers the Sparrow draft as a model and keeps its attention on text positions.

    sparrow export-vllm drafts/sparrow served-draft/        # the draft as a folder vLLM loads
    vllm serve /models/Qwen2.5-VL-7B-Instruct --no-enable-prefix-caching --speculative-config \\
      '{"method": "eagle", "model": "served-draft", "num_speculative_tokens": 4,
        "disable_padded_drafter_batch": true}'

What it changes in vLLM, and why a patch: vLLM's EAGLE path has no extension point for the
proposer (`custom_class` proposers get token ids only, no target features), so `register`
replaces the name EagleProposer in the model runner's module by SparrowProposer (proposer.py),
which is vLLM's EagleProposer for any draft that is not Sparrow's. That ties the plugin to vLLM's
internals: `register` checks the version against SUPPORTED and refuses another.
"""

from __future__ import annotations

SUPPORTED = ("0.32.",)  # vLLM versions whose proposer and runner this plugin was written against


class UnsupportedVLLM(RuntimeError):
    pass


def check_version(version: str) -> None:
    if not version.startswith(SUPPORTED):
        raise UnsupportedVLLM(
            f"sparrow's vLLM plugin supports vLLM {', '.join(v + 'x' for v in SUPPORTED)}, not {version}: it "
            "replaces vLLM's EAGLE proposer, whose internals change between releases. Install a supported "
            "vLLM, or uninstall sparrow's plugin by setting VLLM_PLUGINS to the plugins you want."
        )


def register() -> None:
    """The plugin's entry point: check vLLM's version, register the draft, install the proposer."""
    import vllm
    from vllm import ModelRegistry

    check_version(vllm.__version__)
    from sparrow.integrations.vllm.model import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "sparrow.integrations.vllm.model:EagleSparrowDraft")
    import vllm.v1.worker.gpu_model_runner as runner

    from sparrow.integrations.vllm.proposer import SparrowProposer

    runner.EagleProposer = SparrowProposer
