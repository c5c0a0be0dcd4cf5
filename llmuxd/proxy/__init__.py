"""llmuxd.proxy package."""
