"""``python -m llmuxd`` = the ``llmuxd`` command."""

from llmuxd.cli import main

raise SystemExit(main())
