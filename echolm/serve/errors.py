"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: `APIError`,
how a request that fails validation becomes one (a 400, never FastAPI's 422), the handlers
that turn every exception into one, and the `responses` entries the OpenAPI schema states."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from echolm.serve.schemas import ErrorResponse


class APIError(Exception):
    """An error answer: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def validation_error(exc: RequestValidationError) -> APIError:
    """The 400 for a request the schema rejects, naming the first problem and its field."""
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({ctx})".replace(" ()", ""),
                        code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "the request needs a JSON body", code="missing_body")
    if first.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param}: {msg}{more}" if param else f"{msg}{more}", param=param,
                    code="invalid_value")


def add_error_handlers(app: FastAPI) -> None:
    """Every failure answers in OpenAI's shape; a client that left gets nothing (499)."""

    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code,
                                                                         str(e.detail))
        return APIError(e.status_code, msg, code=code, headers=getattr(e, "headers", None)
                        ).response()

    @app.exception_handler(ClientGone)
    async def _gone(_r: Request, _e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening any more

    @app.exception_handler(Exception)
    async def _crash(_r: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}",
                        type="server_error").response()


ERRORS = {
    400: "invalid request: bad JSON or UTF-8, wrong types, values out of range, a prompt "
         "too long",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large",
    421: "a Host header this server does not answer (DNS rebinding): see --allow-host",
    429: "too many requests in flight; retry",
    500: "the engine failed",
    503: "the engine is not running",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """An endpoint's error answers for its OpenAPI `responses`."""
    return {c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes}
