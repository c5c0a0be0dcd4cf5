"""Error bodies in the exact shapes vLLM 0.32 (FastAPI) answers with."""

from __future__ import annotations


class SimHttpError(Exception):
    """Answer the current request with `status` and `body`, then go on (or close)."""

    def __init__(self, status: int, body: object, *, close: bool = False,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body
        self.close = close
        self.headers = headers or []


def openai_error(status: int, message: str, type_: str, param: str | None = None) -> dict:
    """vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def bad_request(message: str, param: str | None = None) -> SimHttpError:
    """A request vLLM's serving layer rejects (type BadRequestError)."""
    return SimHttpError(400, openai_error(400, message, "BadRequestError", param))


def validation_error(type_: str, loc: str, msg: str, input_: object, ctx: dict | None = None,
                     ) -> SimHttpError:
    """A pydantic validation failure as vLLM renders it (type "Bad Request")."""
    detail: dict[str, object] = {"type": type_, "loc": loc, "msg": msg, "input": input_}
    if ctx:
        detail["ctx"] = ctx
    message = f"1 validation error:\n  {detail!r}"
    return SimHttpError(400, openai_error(400, message, "Bad Request", loc))


def plain_bad_request(message: str) -> SimHttpError:
    """An HTTPException(400) from a dev endpoint (type "Bad Request", param null)."""
    return SimHttpError(400, openai_error(400, message, "Bad Request", None))


def internal_error(message: str) -> SimHttpError:
    """A 500; vLLM's server then drops the connection, so we close it too."""
    return SimHttpError(
        500, openai_error(500, message, "InternalServerError", None), close=True
    )


def not_found_model(name: object, valid: list[str]) -> SimHttpError:
    return SimHttpError(
        404,
        openai_error(
            404,
            f"The model `{name}` does not exist. Valid aliases: {', '.join(valid)}.",
            "NotFoundError",
            "model",
        ),
    )


NOT_FOUND = SimHttpError(404, {"detail": "Not Found"})


def method_not_allowed(allow: list[str]) -> SimHttpError:
    return SimHttpError(
        405, {"detail": "Method Not Allowed"}, headers=[("allow", ", ".join(allow))]
    )
