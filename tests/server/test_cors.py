"""CORS against a real server: a browser page on an allowed origin can read the
X-Codecstream-* headers of the HTTP file endpoints (`Access-Control-Expose-Headers`)."""

from __future__ import annotations

import io
import wave

import httpx
import numpy as np

from server.http_api import EXPOSED_HEADERS
from tests.server.conftest import load_clip, start_server

ORIGIN = "https://app.example"


def _wav(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())
    return buffer.getvalue()


def _exposed(response: httpx.Response) -> set[str]:
    raw = response.headers.get("access-control-expose-headers", "")
    return {name.strip().lower() for name in raw.split(",") if name.strip()}


def _codecstream_headers(response: httpx.Response) -> set[str]:
    return {name.lower() for name in response.headers if name.lower().startswith("x-codecstream-")}


async def test_cors_exposes_every_codecstream_header_of_encode_and_decode() -> None:
    """Every X-Codecstream-* header /v1/encode and /v1/decode send is exposed (so a header
    added to server.http_api without `EXPOSED_HEADERS` fails here), to allowed origins."""
    running = start_server(cors_origins=(ORIGIN,), engine_processes=0)
    try:
        async with httpx.AsyncClient(base_url=running.http, timeout=30) as client:
            headers = {"Origin": ORIGIN}
            encoded = await client.post(
                "/v1/encode", content=_wav(load_clip()[:3200]), headers=headers
            )
            decoded = await client.post("/v1/decode", content=encoded.content, headers=headers)
            for response in (encoded, decoded):
                assert response.status_code == 200, response.text
                assert response.headers["access-control-allow-origin"] == ORIGIN
                sent = _codecstream_headers(response)
                assert sent and sent <= _exposed(response), (sent, _exposed(response))
            assert _exposed(encoded) == {name.lower() for name in EXPOSED_HEADERS}
            other = await client.post(
                "/v1/encode", content=_wav(load_clip()[:3200]),
                headers={"Origin": "https://other.example"},
            )
            assert "access-control-allow-origin" not in other.headers
    finally:
        running.stop()
