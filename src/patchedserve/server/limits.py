"""A cap on request bodies: a body larger than ``MAX_BODY_BYTES`` is a 413 before it is parsed.

The largest valid images request, two prompts of ``models.validation.MAX_PROMPT_CHARS`` characters and the
other fields, is under 800 KB even when every character is sent as an escaped surrogate pair
(``\ud83d\ude00``, 12 bytes), so 1 MiB refuses only what no valid request needs, without reading
a client's gigabyte into memory first. A declared
``Content-Length`` over the cap is refused at once; a body sent without one (chunked) is counted
as it arrives and refused once it passes the cap. Installed by `server.app`.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from patchedserve.server.errors import APIError, error_response

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted, in bytes."""


def too_large(limit: int) -> APIError:
    message = f"the request body is larger than this server accepts ({limit} bytes)"
    return APIError(413, message, code="request_too_large")


class BodyLimit:
    """ASGI middleware that answers 413 (an OpenAI error object) to a body over ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await error_response(too_large(self.limit))(scope, receive, send)
            return
        received, refused, started = 0, False, False

        async def counting_receive() -> Message:
            # A streamed body past the cap: answer 413 here, then tell the app the client left,
            # so it stops reading; whatever it then tries to send is dropped.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await error_response(too_large(self.limit))(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if not refused:
                started = started or message["type"] == "http.response.start"
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
