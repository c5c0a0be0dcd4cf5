"""llmuxd.sim package."""
