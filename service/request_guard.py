"""The ASGI guard in front of BentoML: every malformed request gets a 4xx before BentoML parses it.

BentoML (1.4.39) answers 500 to several malformed multipart bodies (no ``boundary=``, a body that
does not match its boundary, file names its temporary-file naming cannot hold, a text value where
a file is expected, more parts than Starlette allows), reads every uploaded file into memory, and
counts a request against its concurrency slots while the body is still arriving, so a few hundred
clients that stall mid-body refuse everyone else. This guard therefore:

* reads the body itself, within a deadline (``HISTO_BODY_TIMEOUT_S`` for patches,
  ``HISTO_SLIDE_BODY_TIMEOUT_S`` for slide uploads) and an idle limit (``HISTO_BODY_IDLE_S``: no
  byte for that long is a stalled client): 408 and the connection closed;
* parses the multipart framing as it arrives (python-multipart, the parser Starlette uses) and
  checks part count, field names, field kinds and file names against the route's form;
* counts a request against ``HISTO_MAX_CONCURRENCY`` only once its body has arrived (BentoML's own
  limit is off for this service), so a stalled upload holds a socket, never a slot;
* streams a slide upload to a private file on disk (``HISTO_MAX_SLIDE_MB``) and hands BentoML a
  few bytes naming it, so neither the worker's memory nor BentoML's task database holds the slide;
* answers a task id that BentoML no longer knows (results do not survive a restart) with a 404
  that says so.

Every refusal is the project's ``{error, detail, index}`` body.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MB = 1024 * 1024
MAX_BODY_BYTES = int(float(os.environ.get("HISTO_MAX_BODY_MB", "32")) * MB)
MAX_SLIDE_BYTES = int(float(os.environ.get("HISTO_MAX_SLIDE_MB", "4096")) * MB)
BODY_TIMEOUT_S = float(os.environ.get("HISTO_BODY_TIMEOUT_S", "30"))
SLIDE_BODY_TIMEOUT_S = float(os.environ.get("HISTO_SLIDE_BODY_TIMEOUT_S", "600"))
BODY_IDLE_S = float(os.environ.get("HISTO_BODY_IDLE_S", "10"))
MAX_CONCURRENCY = int(os.environ.get("HISTO_MAX_CONCURRENCY", "256"))  # whole service, split over workers
UPLOAD_DIR = Path(os.environ.get("HISTO_UPLOAD_DIR") or Path(tempfile.gettempdir()) / "histo-robust-uploads")
# BentoML stores each upload as a temporary file named "tmpXXXXXXXX<file name>": a name near the
# file system's 255-byte limit fails there with a 500, so the guard stops well short of it.
MAX_NAME_BYTES = 200
MAX_BOUNDARY = 200  # RFC 2046 allows 70; curl and browsers stay far below this
MAX_NUMBER_BYTES = 64
UNGUARDED = frozenset({"/metrics", "/healthz", "/livez", "/readyz"})  # never counted or refused
TASK_LOOKUPS = frozenset({"/classify_slide/status", "/classify_slide/get"})
_TOKEN = re.compile(r"[0-9a-f]{32}")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Refusal(Exception):
    """A request answered with ``status`` and the project's error body instead of reaching BentoML."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass(frozen=True)
class FormSpec:
    """What one route's multipart form may hold."""

    files: frozenset[str]  # fields that take files (a part with a filename)
    numbers: frozenset[str]  # fields that take one number (a part without a filename)
    max_files: int
    max_bytes: int
    deadline_s: float
    hint: str  # how to send it right, appended to every refusal about the form
    to_disk: bool = False  # stream the (one) file to UPLOAD_DIR instead of replaying the body


def routes(max_images: int) -> dict[str, FormSpec]:
    """The guarded POST routes (paths as BentoML serves them)."""
    return {
        "/classify": FormSpec(
            files=frozenset({"images"}),
            numbers=frozenset(),
            max_files=max_images,
            max_bytes=MAX_BODY_BYTES,
            deadline_s=BODY_TIMEOUT_S,
            hint="send the patches as files in the form field 'images'",
        ),
        "/classify_slide/submit": FormSpec(
            files=frozenset({"slide"}),
            numbers=frozenset({"mpp"}),
            max_files=1,
            max_bytes=MAX_SLIDE_BYTES,
            deadline_s=SLIDE_BODY_TIMEOUT_S,
            hint="send one slide file in the form field 'slide' (and optionally a number in 'mpp')",
            to_disk=True,
        ),
    }


def error_response(status: int, error: str, detail: str, index: int | None = None, close: bool = False):
    from starlette.responses import JSONResponse

    headers = {"connection": "close"} if close else None  # the unread rest of the body goes with the connection
    return JSONResponse({"error": error, "detail": detail, "index": index}, status_code=status, headers=headers)


def client_file_name(raw: str) -> str:
    """The base name of a client's file name, whatever its path separators."""
    return raw.replace("\\", "/").rsplit("/", 1)[-1]


class FormCheck:
    """Feeds a multipart body to python-multipart and refuses what BentoML would answer with a 500.

    ``sink`` (slides) receives the bytes of the file part; otherwise only the framing is checked
    and the caller keeps the body to replay.
    """

    def __init__(self, spec: FormSpec, boundary: bytes, charset: str, sink: BinaryIO | None = None) -> None:
        self.spec, self.charset, self.sink = spec, charset, sink
        self.files: list[tuple[str, str]] = []  # (field, client file name)
        self.numbers: dict[str, bytes] = {}
        self.parts = 0
        self.ended = False
        self._header_name = self._header_value = self._disposition = b""
        self._field: str | None = None
        self._is_file = False
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._add("_header_name", d[s:e]),
                "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_end": self._end,
            },
        )

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)
        if len(self._header_name) + len(self._header_value) > 16 * 1024:
            raise Refusal(400, "bad_multipart", "a multipart part header is over 16 KB")

    def _part_begin(self) -> None:
        self.parts += 1
        self._disposition, self._field, self._is_file = b"", None, False
        if self.parts > self.spec.max_files + len(self.spec.numbers):
            raise self._too_many()

    def _too_many(self) -> Refusal:
        if self.spec.files == {"images"}:
            return Refusal(
                413,
                "too_many_images",
                f"more than {self.spec.max_files} images in one request; the limit is {self.spec.max_files}",
            )
        return Refusal(413, "too_many_parts", f"more form parts than this form takes; {self.spec.hint}")

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")  # as Starlette does

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise Refusal(422, "bad_form", f"a form part has no name (Content-Disposition); {self.spec.hint}")
        field = self._decode(options[b"name"])
        allowed = self.spec.files | self.spec.numbers
        if field not in allowed:
            raise Refusal(422, "bad_form", f"unexpected form field(s) {[field]}; {self.spec.hint}")
        self._field, self._is_file = field, b"filename" in options
        if field in self.spec.files:
            if not self._is_file:
                raise Refusal(
                    422, "bad_form", f"the field '{field}' takes files, and a text value was sent; {self.spec.hint}"
                )
            name = self._decode(options[b"filename"])
            base = client_file_name(name)
            if len(base.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                raise Refusal(
                    422,
                    "bad_file_name",
                    f"file name {base[:40]!r}... is {len(base.encode('utf-8', 'surrogatepass'))} bytes long; "
                    f"the limit is {MAX_NAME_BYTES}",
                )
            if any(ord(c) < 32 or ord(c) == 127 for c in name):
                raise Refusal(422, "bad_file_name", f"file name {name!r} holds control characters")
            self.files.append((field, base))
            if len(self.files) > self.spec.max_files:
                raise self._too_many()
        else:
            if self._is_file:
                raise Refusal(
                    422, "bad_form", f"the field '{field}' takes a number, and a file was sent; {self.spec.hint}"
                )
            if field in self.numbers:
                raise Refusal(422, "bad_form", f"the field '{field}' was sent twice; {self.spec.hint}")
            self.numbers[field] = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field in self.spec.numbers:
            self.numbers[self._field] += data[start:end]
            if len(self.numbers[self._field]) > MAX_NUMBER_BYTES:
                raise Refusal(422, "bad_form", f"the field '{self._field}' takes a number; {self.spec.hint}")
        elif self.sink is not None:
            self.sink.write(data[start:end])

    def _end(self) -> None:
        self.ended = True

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise _framing(exc) from None

    def finish(self) -> None:
        """Refuse a body that stopped before its closing boundary or held no file."""
        try:
            self.parser.finalize()
        except MultipartParseError as exc:
            raise _framing(exc) from None
        if not self.ended:
            raise _framing(None)
        if not self.files:
            raise Refusal(422, "bad_form", self.spec.hint[0].upper() + self.spec.hint[1:])


def _framing(exc: Exception | None) -> Refusal:
    why = f" ({exc})" if exc is not None else ""
    return Refusal(
        400,
        "bad_multipart",
        f"the body is not multipart/form-data framed by the boundary its Content-Type declares, or it "
        f"stops before the closing boundary{why}",
    )


def parse_number(raw: bytes, field: str) -> float:
    try:
        value = float(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise Refusal(422, "bad_form", f"the field '{field}' must be a number, got {raw[:20]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise Refusal(422, "bad_form", f"the field '{field}' must be a positive number, got {value}")
    return value


# --- slide uploads ------------------------------------------------------------------------------


def new_upload() -> tuple[str, Path]:
    """A fresh token and the private file its slide is streamed to."""
    UPLOAD_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    return token, UPLOAD_DIR / f"{token}.upload"


def upload_path(token: str) -> Path | None:
    """The file a token names (None for anything that is not a token the guard could have made)."""
    token = token.strip()
    return UPLOAD_DIR / f"{token}.upload" if _TOKEN.fullmatch(token) else None


def sweep_uploads(older_than_s: float = 24 * 3600) -> int:
    """Delete uploads left behind by a service that stopped before their task ran; returns how many."""
    removed, cutoff = 0, time.time() - older_than_s
    for path in UPLOAD_DIR.glob("*.upload") if UPLOAD_DIR.is_dir() else []:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def _slide_replay(token: str, name: str, mpp: float | None) -> tuple[bytes, bytes]:
    """The small multipart body BentoML sees for a slide: the token in place of the slide's bytes."""
    boundary = secrets.token_hex(16).encode()
    safe = re.sub(r'["\\]', "_", name).encode("utf-8")
    parts = [
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="slide"; filename="' + safe + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + token.encode() + b"\r\n"
    ]
    if mpp is not None:
        parts.append(
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="mpp"\r\n\r\n' + repr(mpp).encode() + b"\r\n"
        )
    return b"".join(parts) + b"--" + boundary + b"--\r\n", boundary


# --- the middleware -------------------------------------------------------------------------------


class RequestGuard:
    """ASGI middleware in front of BentoML's parser (see the module docstring)."""

    def __init__(
        self, app, max_images: int = 64, workers: int = 1, slide_suffixes: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.routes = routes(max_images)
        self.slide_suffixes = slide_suffixes
        self.max_active = max(1, math.ceil(MAX_CONCURRENCY / max(1, workers)))  # per worker, as BentoML splits it
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("path") == "/model":  # the mounted app lives at /model/
            scope = {**scope, "path": "/model/", "raw_path": b"/model/"}
        path = scope.get("path")
        if path in UNGUARDED:
            return await self.app(scope, receive, send)
        spec = self.routes.get(path) if scope.get("method") == "POST" else None
        upload: Path | None = None
        try:
            if path == "/classify_slide/retry":
                raise Refusal(
                    410, "upload_gone", "a slide upload is deleted when its task ends; submit the slide again"
                )
            if spec is not None:
                scope, receive, upload = await self._read(spec, scope, receive)
        except Refusal as refusal:  # _read has removed any upload it began
            return await error_response(refusal.status, refusal.error, refusal.detail, close=spec is not None)(
                scope, receive, send
            )
        except _Disconnected:
            # nobody reads this answer, but BentoML's timeout middleware waits for a response to
            # start: without one, this request would hold shutdown for the whole traffic timeout
            detail = "the client closed the connection before sending its whole body"
            return await error_response(400, "client_disconnected", detail, close=True)(scope, receive, send)
        if self.active >= self.max_active:
            if upload is not None:
                upload.unlink(missing_ok=True)
            detail = f"{self.active} requests in progress in this worker (HISTO_MAX_CONCURRENCY); retry shortly"
            return await error_response(429, "too_many_requests", detail)(scope, receive, send)
        self.active += 1
        try:
            if path in TASK_LOOKUPS:
                send = _explain_missing_task(scope, send)
            return await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def _read(self, spec: FormSpec, scope, receive) -> tuple[dict, Receive, Path | None]:
        """Read and check the body; returns the scope and receive BentoML gets, and a slide's upload."""
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > spec.max_bytes:
            raise _too_big(spec)
        kind, params = parse_options_header(headers.get(b"content-type", b""))
        if kind.lower() != b"multipart/form-data":
            raise Refusal(415, "not_multipart", f"send a multipart/form-data body: {spec.hint}")
        boundary = params.get(b"boundary", b"")
        if not boundary or len(boundary) > MAX_BOUNDARY:
            raise Refusal(
                400,
                "bad_multipart",
                "the Content-Type has no usable boundary= parameter (let the HTTP client build the multipart body)",
            )
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        token, upload = new_upload() if spec.to_disk else (None, None)
        sink = open(upload, "xb") if upload is not None else None  # noqa: SIM115 - closed below
        try:
            check = FormCheck(spec, boundary, charset, sink)
            chunks = await self._stream(spec, receive, check, keep=sink is None)
            check.finish()
        except BaseException:
            if sink is not None:
                sink.close()
                upload.unlink(missing_ok=True)
            raise
        if sink is None:
            body = b"".join(chunks)
            return scope, _replay(body, receive), None
        sink.close()
        try:
            _, name = check.files[0]
            if Path(name).suffix.lower() not in self.slide_suffixes:
                raise Refusal(
                    415,
                    "not_a_slide",
                    f"{name}: not a slide file name (suffixes: {' '.join(sorted(self.slide_suffixes))}); "
                    "OpenSlide picks its reader by the suffix",
                )
            if upload.stat().st_size == 0:
                raise Refusal(400, "empty_file", f"{name}: empty file")
            mpp = parse_number(check.numbers["mpp"], "mpp") if "mpp" in check.numbers else None
        except BaseException:
            upload.unlink(missing_ok=True)
            raise
        body, boundary = _slide_replay(token, name, mpp)
        rewritten = [(k, v) for k, v in scope.get("headers") or [] if k not in (b"content-length", b"content-type")]
        rewritten += [
            (b"content-type", b"multipart/form-data; boundary=" + boundary),
            (b"content-length", str(len(body)).encode()),
        ]
        return {**scope, "headers": rewritten}, _replay(body, receive), upload

    async def _stream(self, spec: FormSpec, receive: Receive, check: FormCheck, keep: bool) -> list[bytes]:
        """Receive the body into ``check`` within the route's deadline and the idle limit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.deadline_s
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            left = deadline - loop.time()
            wait = min(BODY_IDLE_S, left)
            try:
                message = await asyncio.wait_for(receive(), wait) if wait > 0 else None
            except TimeoutError:
                message = None
            if message is None:
                stalled = wait < left
                raise Refusal(
                    408,
                    "body_timeout",
                    f"no request body bytes for {BODY_IDLE_S:g} s (HISTO_BODY_IDLE_S)"
                    if stalled
                    else f"the request body did not arrive within {spec.deadline_s:g} s",
                )
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > spec.max_bytes:
                raise _too_big(spec)
            check.write(chunk)
            if keep:
                chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks


class _Disconnected(Exception):
    pass


def _too_big(spec: FormSpec) -> Refusal:
    setting = "HISTO_MAX_SLIDE_MB" if spec.to_disk else "HISTO_MAX_BODY_MB"
    return Refusal(413, "body_too_large", f"request body over the {spec.max_bytes} byte limit ({setting})")


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _explain_missing_task(scope, send: Send) -> Send:
    """BentoML's bare 404 for an unknown task id, rewritten to say why a known one can vanish."""
    held: dict[str, Any] | None = None
    replaced = False

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal held, replaced
        if message["type"] == "http.response.start" and message["status"] == 404:
            held = message
            return
        if replaced and message["type"] == "http.response.body":
            return  # the rest of BentoML's own 404 body
        if held is not None and message["type"] == "http.response.body":
            body = json.dumps(
                {
                    "error": "task_not_found",
                    "detail": "no such task here: slide task results are kept by this service process and "
                    "are lost when it restarts (and 24 h after completion); submit the slide again",
                    "index": None,
                }
            ).encode()
            headers = [(k, v) for k, v in held.get("headers", []) if k not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            held, replaced = None, True
            return
        await send(message)

    return wrapped
