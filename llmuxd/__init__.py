"""llmux daemon: supervises vLLM children and switches them with sleep/wake."""

__version__ = "0.2.0"
