"""HTTP endpoints: health, readiness, model cards, metrics, file encode and decode.

* `GET /healthz`: liveness (the process answers), always 200.
* `GET /readyz`: 200 when the model is loaded and the engine worker alive, else 503.
* `GET /v1/models`: the loaded model's card, its per-codebook bitrates, its low-band layouts
  and the bitrate modes of 1, 3 and 6 kbps.
* `GET /metrics`: Prometheus text (server.metrics).
* `POST /v1/encode`: WAV body -> bitstream file (docs/protocol.md, "Bitstream file");
  query `bitrate_kbps` (the card's mode for that budget) or `num_codebooks` [+ `lowband_layout`]
  (default: the 6 kbps mode); headers report the mode.
* `POST /v1/decode`: bitstream file body -> 16-bit mono WAV at the model rate or
  `?sample_rate=` (8000, 16000, 24000, 48000).

File jobs run on the engine worker like any stream (one frame per tick, batched with the live
sessions), count as sessions against the limits, and need an API key when keys are set.
Errors are JSON `{"error": <short code>, "detail": <message>}` with a precise 4xx status:
400 bad query, 401 no/unknown key, 408 body not received within `upload_timeout_s`, 413
body over `max_upload_bytes` or audio over `max_file_seconds`, 415 not a usable WAV or
sample rate, 422 malformed bitstream (the `ErrorCode`) or one made by another model, 429 too
many sessions, 503 not ready (`not_ready`) or shutting down (`shutting_down`: a graceful
shutdown ends the file jobs in flight, uploads included, as it closes the WebSocket sessions
with 1001).  Format, rate and model errors come before `too_long`: a WAV
at 1 Hz is 415 however long, a foreign bitstream 422 however many frames.  Integer query
values are ASCII decimal digits only (`str.isdigit` alone would pass '²').
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect

from server.auth import AuthError, Lease
from server.codes import CloseCode, SessionError
from server.engine_worker import Fatal, Out
from server.jobs import Done, EndMark, StreamJob, TokenOutput
from server.messages import (
    default_mode,
    lowband_layouts,
    mode_fields,
    mode_of,
    named_modes,
)
from server.settings import Settings
from server.state import AppState
from server.wav import WavError, read_wav, write_wav
from streaming.framing import SUPPORTED_RATES, SampleFormat
from streaming.lowband import LAYOUTS
from streaming.model import BitrateMode, ModelCard
from streaming.protocol import (
    BitstreamHeader,
    BitstreamWriter,
    ErrorCode,
    ProtocolError,
    TokenFrame,
    decode_file_header,
    read_bitstream,
)

__all__ = ["EXPOSED_HEADERS", "HttpError", "router"]

router = APIRouter()

BITSTREAM_MEDIA_TYPE: Final = "application/vnd.codecstream.bitstream"
EXPOSED_HEADERS: Final = (
    "X-Codecstream-Model",
    "X-Codecstream-Frames",
    "X-Codecstream-Samples",
    "X-Codecstream-Num-Codebooks",
    "X-Codecstream-Lowband-Layout",
    "X-Codecstream-Bitrate-Kbps",
    "X-Codecstream-Late-Frames",
)
"""Response headers of POST /v1/encode and /v1/decode that CORS lets a
browser page read (`Access-Control-Expose-Headers`; fetch() shows a cross-origin page only
the CORS-safelisted ones otherwise)."""
_RATES: Final = ", ".join(map(str, SUPPORTED_RATES))
_MAX_INT_DIGITS: Final = 18
"""Most significant digits `_uint` converts (larger values are out of every range here)."""
_DECIMAL: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""An unsigned ASCII decimal number (`bitrate_kbps`): `6`, `6.`, `.5`, `2.5`, `1e1`."""


def _uint(raw: str) -> int | None:
    """The value of an unsigned ASCII decimal integer (`0`-`9` only, leading zeros allowed),
    or None for anything else: empty, signs, spaces, non-ASCII digits (`str.isdigit` is true
    for '²' and '٣', which `int` rejects or reads), or more than `_MAX_INT_DIGITS`
    significant digits (`int` refuses over 4300)."""
    if not raw or not raw.isascii() or not raw.isdigit():
        return None
    digits = raw.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else None


class HttpError(Exception):
    """An HTTP error answer: `status`, short `error` code, `detail` message."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail

    def response(self) -> JSONResponse:
        """The JSON error response."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(
            {"error": self.error, "detail": self.detail}, status_code=self.status, headers=headers
        )


def _state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "codec", None)
    if state is None or state.shutting_down:
        raise HttpError(503, "not_ready", "the model is not loaded (starting or stopping)")
    return state


class _FileJobHandle:
    """A file request in flight, registered with the app state like a session, so that a
    graceful shutdown (`AppState.close_all`) ends it: `close` cancels the request's task."""

    def __init__(self, task: asyncio.Task[Any], path: str) -> None:
        self.task = task
        self.path = path
        self.closed = False

    def __repr__(self) -> str:
        return f"<file job POST {self.path}>"

    def close(self, code: CloseCode, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.task.cancel()

    def check_timeouts(self, now: float) -> None:
        """The upload has its own timeout (`_body`); the job runs at the engine's pace."""


@asynccontextmanager
async def _file_job(request: Request) -> AsyncIterator[AppState]:
    """Run a file request as a shutdown-aware job (yields the app state; 503 `not_ready`
    first): when the server shuts down meanwhile, the request ends with 503 `shutting_down`
    (not uvicorn's bare 500 after its grace period)."""
    state = _state(request)
    task = asyncio.current_task()
    assert task is not None
    handle = _FileJobHandle(task, request.url.path)
    state.register(handle)
    try:
        yield state
    except asyncio.CancelledError:
        if handle.closed and task.uncancel() == 0:  # ours, not the client's or uvicorn's
            raise HttpError(
                503, "shutting_down", "the server is shutting down: retry the request"
            ) from None
        raise
    finally:
        state.unregister(handle)


def _admit(state: AppState, request: Request, endpoint: str) -> Lease:
    try:
        key = state.admission.authenticate(request.headers, request.query_params)
    except AuthError as exc:
        raise HttpError(401, "unauthorized", exc.message) from None
    try:
        return state.admission.acquire(key, endpoint)
    except SessionError as exc:
        raise HttpError(429, "too_many_sessions", exc.reason) from None


async def _body(request: Request, settings: Settings) -> bytes:
    """The whole request body: at most `max_upload_bytes` (413), received within
    `upload_timeout_s` (408: a stalled upload must not hold its session slot), not empty."""
    limit = settings.max_upload_bytes
    declared = _uint(request.headers.get("content-length", ""))
    if declared is not None and declared > limit:
        raise HttpError(413, "too_large", f"body of {declared} bytes exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(settings.upload_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, "too_large", f"body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HttpError(
            408, "upload_timeout",
            f"the body did not arrive within {settings.upload_timeout_s:g} s ({size} bytes "
            "received)",
        ) from None
    except ClientDisconnect:
        raise HttpError(400, "client_disconnected", "the client left during the upload") from None
    if not size:
        raise HttpError(400, "empty_body", "the request body is empty")
    return b"".join(chunks)


def _check_duration(settings: Settings, seconds: float, what: str) -> None:
    """413 when a file job's audio is longer than `max_file_seconds`."""
    if seconds > settings.max_file_seconds:
        raise HttpError(
            413, "too_long",
            f"{what} is {seconds:.1f} s of audio; the limit is {settings.max_file_seconds:g} s",
        )


async def _run_job(state: AppState, job: StreamJob, items: list[object]) -> list[Any]:
    """Run a file job on the engine worker; its outputs up to `Done`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    outputs: list[Any] = []

    def sink(batch: list[Any]) -> None:
        for item in batch:
            if isinstance(item, Fatal):
                if not done.done():
                    done.set_exception(HttpError(500, "engine_error", item.reason))
                return
            outputs.append(item)
            if isinstance(item, Done) and not done.done():
                done.set_result(None)

    job.sink = sink
    state.worker.add(job)
    try:
        for item in items:
            state.worker.submit(job, item)
        state.worker.submit(job, EndMark())
        await done
    finally:
        state.worker.remove(job)
    return outputs


def _bitstream(header: BitstreamHeader, frames: list[TokenFrame]) -> bytes:
    """The bitstream file of `frames` (runs in a thread: O(frames) Python)."""
    writer = BitstreamWriter(header)
    writer.add_frames(frames)
    return writer.finalize()


def _mode_query(state: AppState, request: Request) -> BitrateMode:
    """The bitrate mode of an encode query: `bitrate_kbps`, or `num_codebooks` with an optional
    `lowband_layout`, else the default (6 kbps) mode; 400 `bad_query` otherwise."""
    card = state.card
    query = request.query_params
    unknown = sorted(set(query) - {"bitrate_kbps", "num_codebooks", "lowband_layout", "api_key"})
    if unknown:
        raise HttpError(400, "bad_query", f"unknown query parameter {unknown[0]!r}")
    if "bitrate_kbps" in query and "num_codebooks" in query:
        raise HttpError(400, "bad_query", "give bitrate_kbps or num_codebooks, not both")
    if "lowband_layout" in query and "num_codebooks" not in query:
        raise HttpError(
            400, "bad_query", "lowband_layout is only valid together with num_codebooks"
        )
    if "num_codebooks" in query:
        return _exact_mode(card, query["num_codebooks"], query.get("lowband_layout"))
    if "bitrate_kbps" in query:
        return _budget_mode(card, query["bitrate_kbps"])
    return default_mode(card)


def _exact_mode(card: ModelCard, raw_codebooks: str, raw_layout: str | None) -> BitrateMode:
    """The exact mode of `num_codebooks` (1..Q) and `lowband_layout` (one of the card's
    layouts; None: 0, no low band), ASCII decimal integers; 400 `bad_query` otherwise."""
    codebooks = _uint(raw_codebooks)
    if codebooks is None or not 1 <= codebooks <= card.num_codebooks:
        raise HttpError(
            400, "bad_query", f"num_codebooks must be an integer in 1..{card.num_codebooks}"
        )
    layouts = lowband_layouts(card)
    layout = 0 if raw_layout is None else _uint(raw_layout)
    if layout is None or layout not in layouts:
        raise HttpError(
            400, "bad_query", f"lowband_layout must be one of {', '.join(map(str, layouts))}"
        )
    return mode_of(card, codebooks, layout)


def _budget_mode(card: ModelCard, raw: str) -> BitrateMode:
    """The card's mode for a budget of `raw` kbps, an unsigned ASCII decimal number (`float`
    alone would also take '٣', '1_0', ' 6', 'inf'); 400 `bad_query` otherwise."""
    if not _DECIMAL.fullmatch(raw):
        raise HttpError(400, "bad_query", f"bitrate_kbps must be a decimal number, got {raw!r}")
    kbps = float(raw)
    if not math.isfinite(kbps):
        raise HttpError(400, "bad_query", f"bitrate_kbps {raw!r} is out of range")
    try:
        return card.mode_for_bitrate(kbps)
    except ValueError as exc:
        raise HttpError(400, "bad_query", f"bitrate_kbps: {exc}") from None


def _modes_entry(card: ModelCard) -> dict[str, Any]:
    """What /v1/models says about bitrates: per-codebook rates without low band, the
    low-band layouts, the named modes (1, 3, 6 kbps) and the default mode."""
    return {
        "default_num_codebooks": default_mode(card).num_codebooks,
        "default_mode": mode_fields(default_mode(card)),
        "bitrates_kbps": {
            str(n): card.bitrate_kbps(n) for n in range(1, card.num_codebooks + 1)
        },
        "lowband_layouts": {
            str(lid): {
                "bins": LAYOUTS[lid].bins,
                "band_hz": [0.0, LAYOUTS[lid].bins * card.sample_rate / (2 * card.frame_size)],
                "step": LAYOUTS[lid].step,
                "mean_bits": LAYOUTS[lid].mean_bits,
            }
            for lid in lowband_layouts(card)
            if lid
        },
        "modes": {f"{kbps:g}": mode_fields(mode) for kbps, mode in named_modes(card).items()},
    }


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: model loaded and engine worker alive (503 otherwise)."""
    state: AppState | None = getattr(request.app.state, "codec", None)
    if state is None or state.shutting_down or not state.worker.alive:
        return JSONResponse({"status": "not_ready"}, status_code=503)
    return JSONResponse({"status": "ready", "model_id": state.card.model_id})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    """The model cards (one model per server)."""
    try:
        state = _state(request)
        state.admission.authenticate(request.headers, request.query_params)
    except HttpError as exc:
        return exc.response()
    except AuthError as exc:
        return HttpError(401, "unauthorized", exc.message).response()
    card = state.card
    entry = {
        "model_id": card.model_id,
        "random_weights": card.random_weights,
        "sample_rate": card.sample_rate,
        "frame_size": card.frame_size,
        "num_codebooks": card.num_codebooks,
        **_modes_entry(card),
        "algorithmic_latency_ms": card.algorithmic_latency_ms,
        "card": dict(card.raw),
    }
    return JSONResponse({"models": [entry]})


@router.post("/v1/encode")
async def encode_file(request: Request) -> Response:
    """WAV body -> bitstream file."""
    try:
        async with _file_job(request) as state:
            return await _encode(state, request)
    except HttpError as exc:
        return exc.response()


def _check_wav_rate(rate: int) -> None:
    """415 `unsupported_rate` unless the WAV's `rate` (Hz, from its header: may be 0) is one
    the framers take."""
    if rate not in SUPPORTED_RATES:
        raise HttpError(
            415, "unsupported_rate", f"sample rate {rate} Hz is not supported (use {_RATES})"
        )


async def _encode(state: AppState, request: Request) -> Response:
    """`POST /v1/encode` (after `_file_job`'s 503).  Errors in this order: 401, 429, 400
    query, body (400, 408, 413 `too_large`), WAV (400/415 `bad_wav`), 415
    `unsupported_rate`, 413 `too_long`."""
    card = state.card
    lease = _admit(state, request, "http_encode")
    try:
        mode = _mode_query(state, request)
        body = await _body(request, state.settings)
        state.metrics.bytes_received.labels("http_encode").inc(len(body))
        try:
            pcm, rate = await asyncio.to_thread(read_wav, body)
        except WavError as exc:
            raise HttpError(exc.status, "bad_wav", exc.message) from None
        _check_wav_rate(rate)  # first: the duration divides by it (0 Hz), and 415 before 413
        _check_duration(state.settings, len(pcm) / rate, "the WAV file")
        job = StreamJob(
            state.model,
            lambda _: None,
            endpoint="http_encode",
            encode=True,
            decode=False,
            rate=rate,
            fmt=SampleFormat.F32LE,
            mode=mode,
            tokens=TokenOutput.FRAMES,
            http=True,
        )
        outputs = await _run_job(state, job, [pcm] if pcm.size else [])
    finally:
        lease.release()
    frames = [item for item in outputs if isinstance(item, TokenFrame)]
    done = next(item for item in outputs if isinstance(item, Done))
    header = BitstreamHeader(
        card.model_id,
        card.sample_rate,
        card.frame_size,
        card.code_bits,
        card.gain.bits,
        card.num_codebooks,
    )
    data = await asyncio.to_thread(_bitstream, header, frames)
    state.metrics.bytes_sent.labels("http_encode").inc(len(data))
    return Response(
        data,
        media_type=BITSTREAM_MEDIA_TYPE,
        headers={
            "X-Codecstream-Model": card.model_id,
            "X-Codecstream-Frames": str(len(frames)),
            "X-Codecstream-Num-Codebooks": str(mode.num_codebooks),
            "X-Codecstream-Lowband-Layout": str(mode.lowband_layout),
            "X-Codecstream-Bitrate-Kbps": f"{mode.kbps:g}",
            "X-Codecstream-Late-Frames": str(done.late_frames),
        },
    )


@router.post("/v1/decode")
async def decode_file(request: Request) -> Response:
    """Bitstream file body -> 16-bit WAV."""
    try:
        async with _file_job(request) as state:
            return await _decode(state, request)
    except HttpError as exc:
        return exc.response()


def _rate_query(state: AppState, request: Request) -> int:
    """The output rate (Hz) of a decode query: `sample_rate` (an ASCII decimal integer, one
    of `SUPPORTED_RATES`: else 415 `unsupported_rate`), default the model's."""
    query = request.query_params
    unknown = sorted(set(query) - {"sample_rate", "api_key"})
    if unknown:
        raise HttpError(400, "bad_query", f"unknown query parameter {unknown[0]!r}")
    raw = query.get("sample_rate")
    if raw is None:
        return state.card.sample_rate
    rate = _uint(raw)
    if rate is None or rate not in SUPPORTED_RATES:
        raise HttpError(415, "unsupported_rate", f"sample_rate must be one of {_RATES}")
    return rate


def _check_header(state: AppState, header: BitstreamHeader) -> None:
    """422 `model_mismatch` unless the bitstream was made by this server's model with its
    parameters (rate, frame size, bit widths, Q)."""
    card = state.card
    if header.model_id != card.model_id:
        raise HttpError(
            422,
            "model_mismatch",
            f"the bitstream was made by model {header.model_id!r}; this server runs "
            f"{card.model_id!r}",
        )
    ours = (card.sample_rate, card.frame_size, card.code_bits, card.gain.bits, card.num_codebooks)
    theirs = (
        header.sample_rate,
        header.frame_size,
        header.code_bits,
        header.gain_bits,
        header.num_codebooks,
    )
    if ours != theirs:
        raise HttpError(
            422,
            "model_mismatch",
            f"bitstream parameters (rate, frame, code bits, gain bits, Q) {theirs} differ from "
            f"the model's {ours}",
        )


def _protocol_error(state: AppState, exc: ProtocolError) -> HttpError:
    """422 with the `ErrorCode` of a malformed bitstream (counted in `packet_errors`)."""
    state.metrics.packet_errors.labels(exc.code.value).inc()
    return HttpError(422, exc.code.value, exc.message)


async def _read_frames(state: AppState, body: bytes) -> list[TokenFrame]:
    """The frames of a bitstream file `body` made by this model.  Errors in this order: 422
    for a malformed header (its `ErrorCode`; `oversized` for a header length over 1024
    bytes), 422 `model_mismatch`, then 413 `too_long` for more frames than
    `max_file_seconds` of audio (said by the header's count, or met while reading a
    streamed file), 422 for malformed frames."""
    try:
        header, _ = decode_file_header(body)  # at most 1024 bytes: no thread
    except ProtocolError as exc:
        raise _protocol_error(state, exc) from None
    _check_header(state, header)
    max_frames = math.floor(
        state.settings.max_file_seconds * state.card.sample_rate / state.card.frame_size
    )
    try:
        _, frames = await asyncio.to_thread(
            functools.partial(read_bitstream, body, max_frames=max_frames)
        )
    except ProtocolError as exc:
        error = _protocol_error(state, exc)  # counted in packet_errors either way
        if exc.code == ErrorCode.OVERSIZED:
            # the header passed above and no max_bytes is given: only the frame limit is left
            error = HttpError(
                413, "too_long",
                f"{exc.message} (max_file_seconds {state.settings.max_file_seconds:g} s)",
            )
        raise error from None
    return frames


async def _decode(state: AppState, request: Request) -> Response:
    """`POST /v1/decode` (after `_file_job`'s 503).  Errors in this order: 401, 429, 400/415
    query, body (400, 408, 413 `too_large`), then those of `_read_frames` (422, 413
    `too_long`)."""
    lease = _admit(state, request, "http_decode")
    try:
        rate = _rate_query(state, request)
        body = await _body(request, state.settings)
        state.metrics.bytes_received.labels("http_decode").inc(len(body))
        frames = await _read_frames(state, body)
        job = StreamJob(
            state.model,
            lambda _: None,
            endpoint="http_decode",
            encode=False,
            decode=True,
            rate=rate,
            fmt=SampleFormat.S16LE,
            tokens=TokenOutput.NONE,
            http=True,
        )
        outputs = await _run_job(state, job, [frames] if frames else [])
    finally:
        lease.release()
    pcm = b"".join(
        item.data for item in outputs if isinstance(item, Out) and isinstance(item.data, bytes)
    )
    data = write_wav(pcm, rate)
    state.metrics.bytes_sent.labels("http_decode").inc(len(data))
    return Response(
        data,
        media_type="audio/wav",
        headers={
            "X-Codecstream-Model": state.card.model_id,
            "X-Codecstream-Frames": str(len(frames)),
            "X-Codecstream-Samples": str(len(pcm) // 2),
        },
    )
