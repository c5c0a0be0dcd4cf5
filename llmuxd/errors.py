"""The control API's one error shape and its stable codes.

Every failure a client can see is an ``ApiError``: a code from the table in
docs/interfaces.md, the HTTP status that goes with it, and a message a person can
act on. Code that refuses something raises one; the server renders it.
"""

from __future__ import annotations

from typing import Any

STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "permission_denied": 403,
    "model_not_found": 404,
    "not_found": 404,
    "conflict": 409,
    "queue_full": 429,
    "model_failed": 503,
    "shutting_down": 503,
    "timeout": 504,
    "internal": 500,
}


class ApiError(Exception):
    """A refusal with a stable code; ``model`` and ``extra`` go into the JSON body."""

    def __init__(self, code: str, message: str, model: str | None = None,
                 **extra: Any) -> None:
        if code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.model = model
        self.extra = extra

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.code]

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.model is not None:
            body["model"] = self.model
        body.update(self.extra)
        return {"error": body}


def model_not_found(name: str) -> ApiError:
    return ApiError("model_not_found", f"unknown model '{name}'", model=name)


def shutting_down() -> ApiError:
    return ApiError("shutting_down", "llmuxd is shutting down")
