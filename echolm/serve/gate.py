"""The `Gate` middleware in front of the app: API key, body size, UTF-8."""

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from echolm.serve.errors import APIError

PROTECTED = ("/v1/", "/api/")  # the paths that need the API key, when the server has one


class Gate:
    """Pure ASGI middleware (it never buffers responses, so streaming stays streaming):
    checks the API key on /v1/ and /api/, caps the body size, rejects bodies that are not
    UTF-8, and hands the app the body it read."""

    def __init__(self, app: ASGIApp, max_body: int, api_key: str | None) -> None:
        self.app, self.max_body, self.api_key = app, max_body, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key and path.startswith(PROTECTED) and not self._authorized(scope):
            await self._drain(receive)
            await APIError(401, "incorrect or missing API key: send 'Authorization: Bearer "
                           "KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive,
                                                                              send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        too_big = APIError(413, f"the request body is larger than {self.max_body} bytes",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._drain(receive)
            await too_big.response()(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await self._drain(receive) if more else None
                await too_big.response()(scope, receive, send)
                return
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            await APIError(400, f"the request body is not valid UTF-8 (byte {e.start})",
                           code="invalid_encoding").response()(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(
                    token.strip().encode(), self.api_key.encode())
        return False

    @staticmethod
    async def _drain(receive: Receive, limit: int = 64 << 20) -> None:
        """Read (and drop) the rest of the body, so the client gets to read our answer."""
        seen = 0
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
