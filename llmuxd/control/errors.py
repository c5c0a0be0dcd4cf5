"""The control API's error shape: re-exported from ``llmuxd.errors`` (the bottom layer).

``ApiError`` lives in ``llmuxd/errors.py`` so that the lease table and the model
operations below the control API can raise it without importing ``control/``.
"""

from llmuxd.errors import STATUS_BY_CODE, ApiError, model_not_found, shutting_down

__all__ = ["STATUS_BY_CODE", "ApiError", "model_not_found", "shutting_down"]
