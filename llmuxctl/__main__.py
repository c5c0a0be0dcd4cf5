"""``python -m llmuxctl``: the same as the ``llmuxctl`` console script."""

from llmuxctl.cli import main

raise SystemExit(main())
