"""File coding through a server: WebSocket (/v1/encode, /v1/decode) or HTTP file endpoints.

The client prepares exactly what the local path encodes (model-rate PCM zero-padded to whole
frames, see client.files) and sends it as f32le at the model rate, so the server's tokens
are those of the local engine; decoding sends one token packet per frame and collects the
f32le PCM, which `client.files.frames_to_audio` aligns like a local decode.  Sending and
receiving run concurrently (the server applies flow control; nothing is dropped).

The HTTP endpoints (`POST /v1/encode`: WAV -> bitstream, `POST /v1/decode`: bitstream ->
16-bit WAV) get the same prepared float WAV / the file, and the client aligns the result the
same way (the decoded samples are rounded to 16 bits by the server).
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import soundfile as sf

from client.errors import ClientError
from client.files import CHUNK_FRAMES, CodecParams, PreparedInput
from client.session import (
    RESPONSE_TIMEOUT_S,
    Ready,
    Session,
    api_key_headers,
    http_url,
    mode_fields,
)
from streaming.model import BitrateMode, ModelCard
from streaming.protocol import (
    BitstreamHeader,
    ProtocolError,
    TokenFrame,
    TokenPacket,
    decode_packet,
    encode_packet,
    read_bitstream,
)

__all__ = [
    "decode_http",
    "decode_remote",
    "encode_http",
    "encode_remote",
    "params_from_ready",
]

HTTP_TIMEOUT_S = 300.0

F32: TypeAlias = npt.NDArray[np.float32]
Progress: TypeAlias = Callable[[int], object]


def params_from_ready(ready: Ready, local: ModelCard) -> CodecParams:
    """Codec parameters of a server session (at the model rate).

    The decoder delay D is the local card's when the server runs the same model; otherwise a
    /v1/decode session gives it (its `algorithmic_latency_ms` is the synthesis overlap at the
    model rate) and other sessions fall back to the local card's value."""
    rate = int(ready["sample_rate_model"])
    delay = local.output_delay_samples
    if local.model_id != ready["model_id"] and ready.get("endpoint") == "decode":
        delay = round(float(ready["algorithmic_latency_ms"]) * rate / 1000.0)
    return CodecParams(
        model_id=str(ready["model_id"]),
        sample_rate=rate,
        frame_size=int(ready["frame_size"]),
        output_delay_samples=delay,
        code_bits=int(ready["code_bits"]),
        gain_bits=int(ready["gain_bits"]),
        num_codebooks=int(ready["max_codebooks"]),
    )


def _check_rate(ready: Ready, rate: int) -> None:
    if int(ready["sample_rate_model"]) != rate:
        raise ClientError(
            f"the server's model runs at {ready['sample_rate_model']} Hz, this client's at "
            f"{rate} Hz: file coding needs the same model rate"
        )


async def open_encoder(
    server: str, rate: int, mode: BitrateMode, api_key: str | None, rate_cap: bool = False
) -> Session:
    """An /v1/encode session taking f32le PCM at `rate` and returning binary packets in
    bitrate `mode` (sent exactly: codebooks and low-band layout; `rate_cap`: the server
    holds them to the mode's rate)."""
    hello: dict[str, Any] = {
        "sample_rate": rate,
        "format": "f32le",
        **mode_fields(mode),
        "tokens": "binary",
    }
    if rate_cap:
        hello["rate_cap"] = True
    session = await Session.open(server, "/v1/encode", hello, api_key=api_key)
    _check_rate(session.ready, rate)
    return session


async def encode_remote(
    session: Session, prepared: PreparedInput, params: CodecParams, progress: Progress
) -> list[TokenFrame]:
    """Tokens of `prepared.pcm` encoded by the server behind `session` (then closed)."""
    step = CHUNK_FRAMES * params.frame_size
    frames: list[TokenFrame] = []

    async def send() -> None:
        for i in range(0, prepared.pcm.shape[0], step):
            await session.send_bytes(prepared.pcm[i : i + step].astype("<f4").tobytes())
        await session.send_json({"type": "end"})

    async def receive() -> None:
        async for message in session.messages(RESPONSE_TIMEOUT_S):
            if isinstance(message, bytes):
                frames.append(_packet(message, params).frame)
                progress(1)

    await asyncio.gather(send(), receive())
    if len(frames) != prepared.frames:
        raise ClientError(f"the server returned {len(frames)} frames, {prepared.frames} expected")
    return frames


def _packet(data: bytes, params: CodecParams) -> TokenPacket:
    try:
        return decode_packet(
            data,
            code_bits=params.code_bits,
            gain_bits=params.gain_bits,
            max_codebooks=params.num_codebooks,
        )
    except ProtocolError as exc:
        raise ClientError(f"the server sent an invalid token packet: {exc}") from None


async def open_decoder(server: str, rate: int, api_key: str | None) -> Session:
    """A /v1/decode session taking binary packets and returning f32le PCM at `rate`."""
    hello: dict[str, Any] = {"sample_rate": rate, "format": "f32le", "tokens": "binary"}
    session = await Session.open(server, "/v1/decode", hello, api_key=api_key)
    _check_rate(session.ready, rate)
    return session


async def decode_remote(
    session: Session, frames: Sequence[TokenFrame], params: CodecParams, progress: Progress
) -> F32:
    """Model-rate PCM of `frames` decoded by the server behind `session` (then closed):
    len(frames) * N samples, the decoder delay included (as `decode_frames_local`)."""
    out = np.zeros(len(frames) * params.frame_size, dtype=np.float32)
    pos = 0

    async def send() -> None:
        for i, frame in enumerate(frames):
            packet = TokenPacket(0, i & 0xFFFF, (20000 * i) & 0xFFFFFFFF, frame)
            await session.send_bytes(
                encode_packet(packet, code_bits=params.code_bits, gain_bits=params.gain_bits)
            )
        await session.send_json({"type": "end"})

    async def receive() -> None:
        nonlocal pos
        async for message in session.messages(RESPONSE_TIMEOUT_S):
            if isinstance(message, bytes):
                pcm = np.frombuffer(message, dtype="<f4")
                n = min(pcm.shape[0], out.shape[0] - pos)
                out[pos : pos + n] = pcm[:n]
                pos += pcm.shape[0]
                progress(round(pcm.shape[0] / params.frame_size))

    await asyncio.gather(send(), receive())
    if pos != out.shape[0]:
        raise ClientError(f"the server returned {pos} samples, {out.shape[0]} expected")
    return out


# ---- HTTP file endpoints ------------------------------------------------------------------


def _http_post(url: str, body: bytes, content_type: str, api_key: str | None) -> bytes:
    """POST `body`; the response body, or a ClientError quoting the server's JSON error."""
    headers = {"Content-Type": content_type, **api_key_headers(api_key)}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace")
        try:
            parsed = json.loads(detail)
            if "error" in parsed:
                detail = f"{parsed['error']}: {parsed.get('detail')}"
            else:  # not one of the server's errors (e.g. FastAPI's 404 {"detail": ...})
                detail = str(parsed.get("detail", detail))[:200]
        except (ValueError, AttributeError, TypeError):
            detail = detail[:200]
        raise ClientError(f"{url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ClientError(f"cannot reach {url}: {exc}") from None


def encode_http(
    server: str,
    prepared: PreparedInput,
    params: CodecParams,
    mode: BitrateMode,
    api_key: str | None,
) -> tuple[BitstreamHeader, list[TokenFrame]]:
    """The server's bitstream header and the tokens of `prepared.pcm` from `POST /v1/encode`
    (a float WAV at the model rate) in bitrate `mode`.  The header names the server's model;
    ClientError when its parameters are not those `prepared` was made for."""
    wav = io.BytesIO()
    sf.write(wav, prepared.pcm, params.sample_rate, format="WAV", subtype="FLOAT")
    url = http_url(server, f"/v1/encode?{urllib.parse.urlencode(mode_fields(mode))}")
    data = _http_post(url, wav.getvalue(), "audio/wav", api_key)
    try:
        header, frames = read_bitstream(data)
    except ProtocolError as exc:
        raise ClientError(f"{url}: the server sent an invalid bitstream ({exc})") from None
    mine = (params.sample_rate, params.frame_size, params.code_bits, params.gain_bits,
            params.num_codebooks)
    theirs = (header.sample_rate, header.frame_size, header.code_bits, header.gain_bits,
              header.num_codebooks)
    if mine != theirs:
        raise ClientError(
            f"{url}: the server's model {header.model_id!r} has (rate, frame, code bits, gain "
            f"bits, codebooks) = {theirs}, this client's model {params.model_id!r} {mine}: "
            "use --transport ws, which adapts to the server's model"
        )
    if len(frames) != prepared.frames:
        raise ClientError(f"the server returned {len(frames)} frames, {prepared.frames} expected")
    return header, frames


def decode_http(
    server: str, file_bytes: bytes, frames: int, params: CodecParams, api_key: str | None
) -> F32:
    """Model-rate PCM (frames * N samples, decoder delay included) from `POST /v1/decode`."""
    url = http_url(server, f"/v1/decode?sample_rate={params.sample_rate}")
    data = _http_post(url, file_bytes, "application/octet-stream", api_key)
    try:
        pcm, rate = sf.read(io.BytesIO(data), dtype="float32")
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ClientError(f"{url}: the server sent unreadable audio ({exc})") from None
    if rate != params.sample_rate or pcm.shape[0] != frames * params.frame_size:
        raise ClientError(
            f"{url}: expected {frames * params.frame_size} samples at {params.sample_rate} Hz, "
            f"got {pcm.shape[0]} at {rate} Hz"
        )
    return np.ascontiguousarray(pcm, dtype=np.float32)
