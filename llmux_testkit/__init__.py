"""Test-only helpers (a real llmuxd, a real simulator process) shared by tests/ and bench/.

Not part of the product: pyproject's package list leaves it out of the wheel and the
.deb; pytest finds it through ``pythonpath = ["."]`` and bench runs from the checkout.
"""
