"""llmuxd.control package."""
