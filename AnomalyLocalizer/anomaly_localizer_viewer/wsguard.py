"""The WebSocket of one reader's server, closed to everyone but its own page.

trame serves over wslink's aiohttp backend, which accepts a connection from any origin and
authenticates it with a secret that is ``wslink-secret`` unless told otherwise, and lets an
authenticated client announce messages of up to 4 GB (memory allocated on the announcement).
:func:`install` changes three things in this process, before the server starts:

- the handshake is refused (HTTP 403) unless the ``Origin`` header is the page's own (the
  same scheme, host and port as the request's ``Host``) or one given with ``--allow-origin``;
- a message may announce at most :data:`.limits.MAX_MESSAGE_BYTES` (an upload and its
  wrapping), and all messages pending on one connection together no more;
- the secret is the one given (made per server start by :mod:`.front`), never the default.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from .limits import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)
FRAME_BYTES = 4 * 1024 ** 2  # one WebSocket frame (the page splits larger messages into frames)


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Whether a handshake's ``Origin`` is the page's own (its host:port is the ``Host`` the
    request was sent to) or one of ``allowed`` (``scheme://host:port``)."""
    if not origin:
        return False  # browsers always send one; a script without one is no page of ours
    origin = origin.rstrip("/").lower()
    if origin in {a.rstrip("/").lower() for a in allowed}:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not host:
        return False
    default = "443" if parts.scheme == "https" else "80"
    own = host.lower() if ":" in host.rsplit("]", 1)[-1] else f"{host.lower()}:{default}"
    theirs = parts.netloc if parts.port else f"{parts.netloc}:{default}"
    return theirs == own


def install(allowed_origins: list[str]) -> None:
    """Apply the origin check and the message bounds to wslink in this process."""
    import os

    import aiohttp.web as web
    from wslink import chunking
    from wslink.backends import aiohttp as backend

    os.environ["WSLINK_MAX_MSG_SIZE"] = str(FRAME_BYTES)
    os.environ["TRAME_WS_MAX_MSG_SIZE"] = str(FRAME_BYTES)
    handler_class = backend.AioHttpWsHandler
    if getattr(handler_class, "_anomaly_localizer_guarded", False):
        return
    original = handler_class.handleWsRequest

    async def handleWsRequest(self, request):
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, request.headers.get("Host"), allowed_origins):
            log.warning("refused a WebSocket from origin %r (not this page's own)", origin)
            return web.Response(status=403, text="this viewer's WebSocket accepts its own page only\n")
        return await original(self, request)

    handler_class.handleWsRequest = handleWsRequest
    handler_class._anomaly_localizer_guarded = True

    def set_max_message_size(self, size):
        self.max_message_size = min(int(size), MAX_MESSAGE_BYTES)

    unchunker = chunking.UnChunker
    process_chunk = unchunker.process_chunk

    def bounded_process_chunk(self, chunk):
        header = chunk[:chunking.HEADER_LENGTH]
        message_id, _, total = chunking._decode_header(header)
        if message_id not in self.pending_messages:
            pending = sum(len(m["content"]) for m in self.pending_messages.values())
            if pending + total > self.max_message_size:
                raise ValueError(f"a message of {total} bytes announced while {pending} bytes are pending: more "
                                 f"than the {self.max_message_size} allowed")
        return process_chunk(self, chunk)

    unchunker.set_max_message_size = set_max_message_size
    unchunker.process_chunk = bounded_process_chunk
