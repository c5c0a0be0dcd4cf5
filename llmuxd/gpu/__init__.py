"""llmuxd.gpu package."""
