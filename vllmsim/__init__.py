"""vllmsim: a stand-in for `vllm serve` (same CLI, HTTP API, sleep semantics, faults).

A program of its own (`llmux-sim-vllm`): it imports nothing from llmuxd.
"""
