"""llmuxd.policy package."""
