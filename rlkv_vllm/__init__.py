"""rlkv-vllm: RLKV head-level KV-cache compression inside stock vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point."""
    from .plugin import register as _register

    _register()
