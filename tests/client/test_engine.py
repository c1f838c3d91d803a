"""The call engine on simulated devices, no network: capture -> packets -> playout."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from client.engine import CaptureSide, PlayoutSide
from client.profiler.analysis import reference_decode
from client.virtual import VirtualAudio
from streaming.model import BitrateMode, CodecModel
from streaming.protocol import TokenFrame, TokenPacket, encode_packet


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


# ---- PlayoutSide.stats() from another thread (the status line) ----------------------------


def sender_packet(model: CodecModel, stream_id: int) -> bytes:
    card = model.card
    packet = TokenPacket(stream_id, 0, 0, TokenFrame(1, 30, (5,)))
    return encode_packet(packet, code_bits=card.code_bits, gain_bits=card.gain.bits)


@pytest.mark.parametrize("change", ["join", "leave"])
def test_stats_is_safe_while_the_playout_thread_changes_the_senders(
    model: CodecModel, change: str
) -> None:
    """A sender joins (its first packet) or leaves on the playout thread exactly while the
    status line's `stats()` walks the senders: the walk must not break, the change happens
    once it is done, and the totals count every sender."""
    port = VirtualAudio(16000, np.zeros(0, np.float32), block=320)
    side = PlayoutSide(model, port, target_ms=0.0)  # no ticks: only the sender bookkeeping
    for stream_id in (1, 2):
        side.receive(sender_packet(model, stream_id), 0.0)
    side.fill()
    assert list(side.senders) == [1, 2]

    def playout_thread() -> None:
        if change == "join":
            side.receive(sender_packet(model, 3), 0.0)
        else:
            side.forget(2)
        side.fill()

    first = side.senders[1].jitter
    first_stats = first.stats
    worker = threading.Thread(target=playout_thread)

    def stats_meanwhile() -> object:  # runs inside stats()'s walk, at sender 1
        if worker.ident is None:  # the first call
            worker.start()
            worker.join(timeout=0.3)  # blocked until the walk ends (or done, if unguarded)
        return first_stats()

    first.stats = stats_meanwhile  # type: ignore[method-assign]
    totals = side.stats()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert totals.senders == 2 and set(totals.per_sender) == {1, 2}
    after = side.stats()
    if change == "join":
        assert set(after.per_sender) == {1, 2, 3} and after.senders == after.received == 3
    else:  # the leaver's counters stay in the totals
        assert set(after.per_sender) == {1} and after.senders == after.received == 2


@pytest.fixture
def fast_thread_switching() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def test_stats_survives_senders_coming_and_going_on_another_thread(
    model: CodecModel, fast_thread_switching: None
) -> None:
    """The audit's stress case, bounded: 30 rounds of 20 senders joining then leaving on a
    playout thread while this thread reads `stats()` as fast as it can."""
    port = VirtualAudio(16000, np.zeros(0, np.float32), block=320)
    side = PlayoutSide(model, port, target_ms=0.0)
    packets = [sender_packet(model, stream_id) for stream_id in range(1, 21)]
    errors: list[BaseException] = []

    def playout_thread() -> None:
        try:
            for _ in range(30):
                for data in packets:
                    side.receive(data, time.perf_counter())
                side.fill()
                for stream_id in range(1, 21):
                    side.forget(stream_id)
                side.fill()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=playout_thread)
    worker.start()
    reads = 0
    while worker.is_alive():
        side.stats()
        reads += 1
    worker.join()
    assert not errors and reads > 0
    totals = side.stats()
    assert totals.senders == totals.received == 30 * 20 and not side.senders
