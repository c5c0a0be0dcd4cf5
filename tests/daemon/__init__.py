"""llmuxd daemon tests."""
