"""llmuxctl: the operator CLI that talks to llmuxd over its control socket."""
