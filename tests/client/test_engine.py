"""The call engine on simulated devices, no network: capture -> packets -> playout."""

from __future__ import annotations

import numpy as np
import pytest

from client.engine import CaptureSide, PlayoutSide
from client.profiler.analysis import reference_decode
from client.virtual import VirtualAudio
from streaming.model import BitrateMode, CodecModel
from streaming.protocol import TokenPacket, encode_packet


class Link:
    """Packets from a CaptureSide to a PlayoutSide, dropping the sequence numbers in `lose`."""

    def __init__(self, playout: PlayoutSide, clock: list[float], lose: set[int]) -> None:
        self.playout = playout
        self.clock = clock
        self.lose = lose
        self.sent: list[TokenPacket] = []

    def __call__(self, packet: TokenPacket) -> None:
        self.sent.append(packet)
        if packet.seq not in self.lose:
            self.playout.receive(encode_packet(packet, code_bits=10, gain_bits=6), self.clock[0])


def call(
    model: CodecModel,
    source: np.ndarray,
    ticks: int,
    lose: set[int] = frozenset(),  # type: ignore[assignment]
    mode: BitrateMode | None = None,
) -> tuple[VirtualAudio, CaptureSide, PlayoutSide, Link]:
    clock = [100.0]
    a = VirtualAudio(16000, source, block=320)
    b = VirtualAudio(16000, np.zeros(0, np.float32), block=320, record_s=ticks * 0.02)
    playout = PlayoutSide(model, b, clock=lambda: clock[0], record=True)
    link = Link(playout, clock, set(lose))
    capture = CaptureSide(
        model, a, link, stream_id=5, num_codebooks=5, mode=mode, clock=lambda: clock[0]
    )
    for _ in range(ticks):
        clock[0] += 0.02
        a.advance(clock[0])
        capture.process()
        b.advance(clock[0])
        playout.fill()
    return b, capture, playout, link


@pytest.mark.parametrize("kbps", [None, 6.0])
def test_played_audio_is_the_offline_decode_at_a_fixed_delay(
    model: CodecModel, speech: tuple[np.ndarray, int], kbps: float | None
) -> None:
    """5 codebooks, or the card's 6 kbps mode (with a low band)."""
    x = speech[0][:16000]
    mode = None if kbps is None else model.card.mode_for_bitrate(kbps)
    b, capture, playout, link = call(model, x, 60, mode=mode)
    if mode is not None:
        assert {p.frame.num_codebooks for p in link.sent} == {mode.num_codebooks}
        assert any(p.frame.lowband_layout == mode.lowband_layout for p in link.sent)
    rec = b.recording[: b.recorded]
    ref = reference_decode(model, x, 5 if mode is None else mode)
    lag = int(np.argmax(np.correlate(rec[:8000], ref[2000:6000], "valid"))) - 2000
    seg, r = rec[lag + 2000 : lag + 14000], ref[2000:14000]
    assert float(seg @ r / np.sqrt((seg @ seg) * (r @ r))) > 0.9999
    # source sample j is captured at T + (j - 319) / 16 kHz, recording sample i played at
    # T + i / 16 kHz: mouth-to-ear = capture 20 + jitter wait 20 + playout FIFO 40 + overlap 5
    assert (lag + 319) / 16 == pytest.approx(85.0, abs=0.1)
    stats = playout.stats()
    assert stats.played == capture.packets_sent - stats.received + stats.played
    assert stats.lost == stats.late == 0
    records = playout.records
    assert records and all(r.played > r.decoded >= r.popped >= r.arrival for r in records)


def test_lost_packets_are_concealed_and_counted(
    model: CodecModel, speech: tuple[np.ndarray, int]
) -> None:
    x = speech[0][:16000]
    _, capture, playout, link = call(model, x, 60, lose={10, 11, 30})
    stats = playout.stats()
    assert len(link.sent) == capture.packets_sent
    assert stats.received == capture.packets_sent - 3
    assert stats.concealed + stats.lost >= 3
    assert stats.played == stats.received - (stats.received - stats.played)


def test_mute_stops_sending_but_keeps_encoding(
    model: CodecModel, speech: tuple[np.ndarray, int]
) -> None:
    x = speech[0][:16000]
    clock = [0.0]
    a = VirtualAudio(16000, x, block=320)
    sent: list[TokenPacket] = []
    capture = CaptureSide(model, a, sent.append, clock=lambda: clock[0])
    for i in range(20):
        capture.muted = 5 <= i < 15
        clock[0] += 0.02
        a.advance(clock[0])
        capture.process()
    assert capture.frames_encoded == 20 and capture.packets_sent == len(sent) == 10
    assert [p.seq for p in sent] == list(range(10))  # no gap in seq: receivers see a pause
    gap = sent[5].timestamp_us - sent[4].timestamp_us
    assert abs(gap - 11 * 20000) <= 1  # capture timestamps keep the real time (µs)


def test_capture_side_can_hold_its_stream_to_the_mode_rate(model: CodecModel) -> None:
    """--rate-cap of `codec-client call`: the capture side's encoder caps its rate."""
    audio = VirtualAudio(16000, np.zeros(320, np.float32), block=320)
    mode = model.card.mode_for_bitrate(3.0)
    capped = CaptureSide(model, audio, [].append, mode=mode, rate_cap=True)
    plain = CaptureSide(model, audio, [].append, mode=mode)
    assert capped.encoder.rate_cap and not plain.encoder.rate_cap
    assert capped.encoder.bitrate_kbps == pytest.approx(mode.kbps)
