"""Jitter buffer scenarios (streaming/jitter.py), scripted tick by tick.

Time is simulated: tick k happens at k × 20 ms and packets listed for a tick arrive just
before its `pop`.  Nothing here measures wall-clock time.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from streaming.jitter import (
    RESTART_RUN,
    InsertResult,
    JitterBuffer,
    JitterConfig,
    JitterStats,
    PlayoutItem,
    PlayoutKind,
)
from streaming.protocol import TokenFrame, TokenPacket, seq_add, seq_diff

FRAME_S = 0.020


def frame_of(seq: int, gain: int = 40, num_codebooks: int = 3) -> TokenFrame:
    """A frame whose first code carries its sequence number (so playout order is visible)."""
    return TokenFrame(num_codebooks, gain, (seq % 1024,) + (7,) * (num_codebooks - 1))


class Driver:
    """Runs one buffer through a script: `tick(seqs)` inserts then pops one item."""

    def __init__(self, config: JitterConfig | None = None, **overrides: object) -> None:
        cfg = config or JitterConfig()
        self.buf = JitterBuffer(dataclasses.replace(cfg, **overrides))  # type: ignore[arg-type]
        self.k = 0
        self.results: list[InsertResult] = []
        self.pending: list[tuple[float, int]] = []  # (arrival in frame times, seq)

    def tick(self, *seqs: int, gain: int = 40, jitter_s: float = 0.0) -> PlayoutItem:
        now = self.k * FRAME_S
        for seq in seqs:
            self.results.append(self.buf.insert(seq, frame_of(seq, gain), now + jitter_s))
        self.k += 1
        return self.buf.pop()

    def run(self, script: list[tuple[int, ...]]) -> list[PlayoutItem]:
        return [self.tick(*seqs) for seqs in script]


def kinds(items: list[PlayoutItem]) -> list[str]:
    return [item.kind.value for item in items]


def played(items: list[PlayoutItem]) -> list[int]:
    return [item.seq for item in items if item.kind == PlayoutKind.FRAME and item.seq is not None]


def fast(**overrides: object) -> Driver:
    """Target pinned to 1 frame: playout starts with the first packet."""
    return Driver(initial_delay_frames=1, min_delay_frames=1, **overrides)


# --------------------------------------------------------------------------- basics


def test_empty_before_the_first_packet() -> None:
    d = Driver()
    assert [d.tick().kind for _ in range(3)] == ["empty"] * 3
    assert d.buf.stats().empty == 3
    assert d.buf.stats().played == 0


def test_initial_buffering_waits_for_the_target() -> None:
    d = Driver(initial_delay_frames=3, min_delay_frames=3)
    out = d.run([(0,), (1,), (2,), (3,), (4,)])
    assert kinds(out) == ["empty", "empty", "frame", "frame", "frame"]
    assert played(out) == [0, 1, 2]
    assert d.buf.current_delay == 2
    assert d.buf.started


def test_in_order_stream_plays_every_frame() -> None:
    d = fast()
    out = d.run([(s,) for s in range(50)])
    assert kinds(out) == ["frame"] * 50
    assert played(out) == list(range(50))
    assert [item.frame for item in out] == [frame_of(s) for s in range(50)]
    stats = d.buf.stats()
    assert (stats.received, stats.played, stats.lost, stats.late, stats.dropped) == (
        50,
        50,
        0,
        0,
        0,
    )
    assert stats.target_delay == 1
    assert set(d.results) == {InsertResult.ACCEPTED}


def test_push_passes_capture_timestamp_and_arrival_through() -> None:
    buf = JitterBuffer(JitterConfig(initial_delay_frames=1))
    packet = TokenPacket(stream_id=9, seq=4, timestamp_us=123456, frame=frame_of(4))
    assert buf.push(packet, now=2.5) == InsertResult.ACCEPTED
    item = buf.pop()
    assert item == PlayoutItem(PlayoutKind.FRAME, frame_of(4), 4, 123456, 2.5)
    assert item.kind == "frame"


# --------------------------------------------------------------------------- reordering


def test_reordering_within_the_target_is_repaired() -> None:
    d = Driver(initial_delay_frames=3, min_delay_frames=3)
    arrivals = [0, 1, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13, 14]
    out = d.run([(s,) for s in arrivals] + [()] * 2)
    assert played(out) == list(range(15))
    stats = d.buf.stats()
    assert stats.lost == stats.late == stats.concealed == 0


def test_reordering_across_wraparound() -> None:
    d = Driver(initial_delay_frames=3, min_delay_frames=3)
    arrivals = [65532, 65533, 65535, 65534, 1, 0, 2, 3, 4, 5]
    out = d.run([(s,) for s in arrivals] + [()] * 2)
    assert played(out) == [65532, 65533, 65534, 65535, 0, 1, 2, 3, 4, 5]
    assert d.buf.stats().lost == 0


def test_in_order_across_wraparound() -> None:
    d = fast()
    seqs = [seq_add(65530, i) for i in range(20)]
    out = d.run([(s,) for s in seqs])
    assert played(out) == seqs
    assert seqs[6] == 0


# --------------------------------------------------------------------------- duplicates / late


def test_duplicates_are_dropped_and_counted() -> None:
    d = Driver(initial_delay_frames=2, min_delay_frames=2)
    out = d.run([(0,), (1, 1), (2, 0), (3,), (4, 2)])
    # 1 twice while buffered; 0 again after it played; 2 again after it played
    assert played(out) == [0, 1, 2, 3]
    assert d.results.count(InsertResult.DUPLICATE) == 3
    stats = d.buf.stats()
    assert (stats.duplicate, stats.late, stats.received) == (3, 0, 8)


def test_late_packet_after_its_tick_is_dropped() -> None:
    d = fast()
    out = d.run([(0,), (1,), (3,), (4, 2), (5,)])
    # 2 is missing at tick 2 but 3 is already buffered beyond the 1-frame target: lost
    assert kinds(out) == ["frame", "frame", "concealed", "frame", "frame"]
    assert played(out) == [0, 1, 3, 4]
    assert out[2].seq == 2
    assert d.results[-3:] == [InsertResult.ACCEPTED, InsertResult.LATE, InsertResult.ACCEPTED]
    stats = d.buf.stats()
    assert (stats.late, stats.lost, stats.concealed) == (1, 1, 1)


def test_delayed_packet_is_waited_for_during_an_underrun() -> None:
    d = fast()
    out = d.run([(0,), (1,), (), (), (2,), (3,), (4,)])
    # nothing newer than 1 arrived: the playout point holds and 2 plays when it comes
    assert kinds(out) == ["frame", "frame", "concealed", "concealed", "frame", "frame", "frame"]
    assert played(out) == [0, 1, 2, 3, 4]
    assert out[2].seq == out[3].seq == 2
    stats = d.buf.stats()
    assert (stats.lost, stats.late, stats.concealed) == (0, 0, 2)


def test_packet_late_by_up_to_the_target_is_waited_for() -> None:
    d = Driver(initial_delay_frames=3, min_delay_frames=3)
    # 5 is due at tick 7 (playout runs 2 frames behind arrivals) but arrives at tick 8
    out = d.run([(0,), (1,), (2,), (3,), (4,), (), (6,), (7,), (5, 8), (9,), (10,)])
    assert kinds(out) == ["empty"] * 2 + ["frame"] * 5 + ["concealed"] + ["frame"] * 3
    assert played(out) == [0, 1, 2, 3, 4, 5, 6, 7]  # 5 still played, one tick later
    stats = d.buf.stats()
    assert (stats.lost, stats.late, stats.concealed) == (0, 0, 1)
    assert d.buf.current_delay == 3  # the hold added one frame of delay


# --------------------------------------------------------------------------- loss concealment


def test_single_loss_is_concealed_with_a_3db_fade() -> None:
    d = fast()
    out = d.run([(s,) for s in range(5)] + [()] + [(s,) for s in range(6, 10)])
    assert kinds(out) == ["frame"] * 5 + ["concealed"] + ["frame"] * 4
    concealed = out[5]
    assert concealed.seq == 5
    assert concealed.frame is not None
    last = frame_of(4)
    # 3 dB = 2 gain steps of 1.5 dB; same codes as the last frame
    assert concealed.frame == TokenFrame(last.num_codebooks, last.gain_index - 2, last.codes)
    assert played(out) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    stats = d.buf.stats()
    assert (stats.lost, stats.concealed, stats.comfort_noise, stats.late) == (1, 1, 0, 0)
    assert d.buf.current_delay == 0  # no delay added: 6 played on its own tick


def test_burst_loss_conceals_then_fades_to_comfort_noise() -> None:
    d = fast()
    script = [(s,) for s in range(5)] + [()] * 10 + [(s,) for s in range(15, 20)]
    out = [d.tick(*seqs, gain=30) for seqs in script]
    gap = out[5:15]
    assert kinds(gap) == ["concealed"] * 3 + ["comfort_noise"] * 7
    assert [item.seq for item in gap] == [5] * 10  # the playout point holds on 5
    gains = [item.frame.gain_index for item in gap if item.frame is not None]
    assert gains[:3] == [28, 26, 24]  # -3, -6, -9 dB
    assert gains[3:] == [20, 20, 18, 16, 14, 12, 10]  # capped at comfort_noise_gain, fading
    cn = gap[3].frame
    assert cn is not None
    assert cn.num_codebooks == 1 and cn.codes == (4,)  # coarse envelope of the last frame
    # when packets resume, the 10 concealed ticks stand for 5..14: 15 plays at once
    assert kinds(out[15:]) == ["frame"] * 5
    assert played(out) == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19]
    stats = d.buf.stats()
    assert (stats.lost, stats.concealed, stats.comfort_noise) == (10, 3, 7)
    assert d.buf.current_delay == 0


def test_fade_never_goes_below_gain_zero() -> None:
    d = fast()
    out = [d.tick(0, gain=3)] + [d.tick() for _ in range(20)]
    gains = [item.frame.gain_index for item in out[1:] if item.frame is not None]
    assert gains[0] == 1
    assert min(gains) == 0 and gains[-1] == 0
    assert gains == sorted(gains, reverse=True)


# --------------------------------------------------------------------------- adaptation


def _jittery(d: Driver, seqs: range, every: int, late_frames: float) -> None:
    """Send `seqs` one per tick; every `every`-th one arrives `late_frames` frames late."""
    for seq in seqs:
        delay = late_frames if every and seq % every == 0 else 0.0
        d.pending.append((seq + delay, seq))
        due = sorted(p for p in d.pending if p[0] <= d.k)
        d.pending = [p for p in d.pending if p[0] > d.k]
        for arrive, s in due:
            d.results.append(d.buf.insert(s, frame_of(s), arrive * FRAME_S))
        d.k += 1
        d.buf.pop()


def test_jitter_increase_raises_target_and_decrease_lowers_it() -> None:
    d = Driver(forget_factor=0.98, catchup_patience=5)
    _jittery(d, range(0, 200), every=0, late_frames=0)
    calm = d.buf.target_delay
    assert calm == 1
    _jittery(d, range(200, 400), every=4, late_frames=3.5)
    jittery = d.buf.stats()
    assert jittery.target_delay >= 5  # 25 % of packets 3.5 frames late: cover them
    assert d.buf.current_delay >= 3  # the buffer grew instead of dropping every 4th frame
    late_share = jittery.late / 200
    assert late_share < 0.05
    _jittery(d, range(400, 700), every=0, late_frames=0)
    calm_again = d.buf.stats()
    assert calm_again.target_delay < jittery.target_delay
    assert calm_again.target_delay <= 2
    assert calm_again.dropped > 0  # catch-up brought the delay back down
    assert d.buf.current_delay <= calm_again.target_delay + d.buf.config.catchup_margin_frames


def test_adaptive_target_beats_a_fixed_minimal_one() -> None:
    adaptive = Driver(forget_factor=0.98)
    pinned = Driver(forget_factor=0.98, initial_delay_frames=1, max_delay_frames=1)
    for d in (adaptive, pinned):
        _jittery(d, range(400), every=4, late_frames=3.5)
    assert pinned.buf.stats().late >= 90  # every 4th packet misses its tick
    assert adaptive.buf.stats().late <= 10  # the buffer grew to cover the jitter


def test_sender_pause_with_timestamps_does_not_inflate_the_target() -> None:
    buf = JitterBuffer(JitterConfig(forget_factor=0.98))
    pause_s = 5.0
    for seq in range(300):
        capture = seq * FRAME_S + (pause_s if seq >= 100 else 0.0)  # sender muted 5 s
        ts_us = round(capture * 1e6) & 0xFFFFFFFF
        buf.insert(seq, frame_of(seq), capture + 0.030, timestamp_us=ts_us)
        buf.pop()
        assert buf.target_delay <= 2
    # sequence numbers continued across the pause: nothing was lost or late
    stats = buf.stats()
    assert stats.lost == stats.late == 0


def test_timestamps_wrap_around_in_the_estimator() -> None:
    buf = JitterBuffer(JitterConfig(forget_factor=0.98, initial_delay_frames=1))
    start_us = 0xFFFFFFFF - 1_000_000  # wraps after 1 s = 50 frames
    for seq in range(200):
        ts_us = (start_us + seq * 20_000) & 0xFFFFFFFF
        buf.insert(seq, frame_of(seq), seq * FRAME_S, timestamp_us=ts_us)
        item = buf.pop()
        assert item.kind == "frame" and item.timestamp_us == ts_us
    assert buf.target_delay == 1


def test_backlog_is_caught_up_by_dropping_frames() -> None:
    target, margin, patience = 2, 2, 3
    d = Driver(
        initial_delay_frames=target,
        min_delay_frames=target,
        max_delay_frames=target,
        catchup_margin_frames=margin,
        catchup_patience=patience,
    )
    out = [d.tick(*range(12))]  # a burst of 12 frames, then one per tick
    out += [d.tick(s) for s in range(12, 60)]
    stats = d.buf.stats()
    assert stats.dropped > 0
    assert stats.concealed == stats.lost == 0
    assert d.buf.current_delay <= target + margin
    seqs = played(out)
    assert seqs == sorted(seqs)
    assert stats.played + stats.dropped == seqs[-1] + 1  # every frame played or dropped
    assert stats.played == len(out)  # never a gap in the output while catching up
    # no catch-up once the level is back within target + margin
    before = stats.dropped
    for s in range(60, 100):
        d.tick(s)
    assert d.buf.stats().dropped == before


def test_no_catch_up_while_within_margin() -> None:
    d = Driver(initial_delay_frames=4, min_delay_frames=4, catchup_patience=2)
    out = d.run([(s,) for s in range(100)])
    assert d.buf.stats().dropped == 0
    assert played(out) == list(range(97))


# --------------------------------------------------------------------------- overflow, reset


def test_packet_too_far_ahead_resyncs() -> None:
    d = fast(capacity=16, max_delay_frames=8)
    d.run([(0,), (1,), (2,)])
    item = d.tick(1000)
    assert d.results[-1] == InsertResult.RESYNC
    assert item.kind == "frame" and item.seq == 1000
    out = d.run([(1001,), (1002,)])
    assert played(out) == [1001, 1002]
    assert d.tick(3).kind == "concealed"  # old sequence numbers are now late
    assert d.results[-1] == InsertResult.LATE
    assert d.buf.stats().resyncs == 1


def test_resync_flushes_buffered_frames() -> None:
    d = Driver(initial_delay_frames=4, min_delay_frames=4, max_delay_frames=8, capacity=16)
    d.run([(0, 1, 2)])
    d.run([(40,)])
    stats = d.buf.stats()
    assert stats.flushed == 3 and stats.resyncs == 1


# --------------------------------------------------------------------------- restarted sender


def _restart_after(d: Driver, old: list[int], new_first: int) -> list[PlayoutItem]:
    """Play `old` one packet a tick, then a sender restarted at `new_first`: 40 packets of
    the new numbering, one a tick; returns the items of the new numbering's ticks."""
    d.run([(s,) for s in old])
    return d.run([(seq_add(new_first, i),) for i in range(40)])


def test_sender_restarting_backwards_resyncs_within_the_run() -> None:
    d = fast()
    out = _restart_after(d, list(range(1000)), 0)  # back to 0, 20 s into the stream
    assert RESTART_RUN == 4
    assert d.results[1000:1004] == [InsertResult.LATE] * 3 + [InsertResult.RESYNC]
    assert set(d.results[1004:]) == {InsertResult.ACCEPTED}
    assert played(out) == list(range(3, 40))  # the first three frames of the new numbering
    assert kinds(out[3:]) == ["frame"] * 37  # the new stream plays, no comfort noise
    stats = d.buf.stats()
    assert (stats.resyncs, stats.late, stats.comfort_noise) == (1, 3, 0)


def test_sender_restarting_backwards_across_wraparound() -> None:
    d = fast()
    # the new numbering wraps inside the run: 65534, 65535, 0, 1 (1000 frames behind)
    out = _restart_after(d, list(range(1000)), 65534)
    assert d.results[1003] == InsertResult.RESYNC
    assert played(out) == [seq_add(1, i) for i in range(37)]
    assert d.buf.stats().resyncs == 1


def test_network_duplicate_inside_a_restart_run_does_not_break_it() -> None:
    d = fast()
    d.run([(s,) for s in range(300)])
    out = d.run([(0,), (1, 1), (2,), (3,), (4,)])
    assert d.results[300:305] == [InsertResult.LATE] * 4 + [InsertResult.RESYNC]
    assert played(out) == [3, 4]


def test_restart_ahead_still_resyncs_at_once() -> None:
    d = fast()
    out = _restart_after(d, list(range(40000, 41000)), 0)  # 0 is 24536 frames "ahead"
    assert d.results[1000] == InsertResult.RESYNC
    assert played(out) == list(range(40))


def test_old_packets_and_duplicates_never_resync() -> None:
    d = fast()
    d.run([(s,) for s in range(300)])
    seq = 300
    out: list[PlayoutItem] = []

    def tick(*old: int) -> None:
        """One tick: the current stream's next packet, then old ones (far behind)."""
        nonlocal seq
        out.append(d.tick(seq, *old))
        seq += 1

    tick(*[100] * 10)  # one old packet, repeated
    tick(*[130, 130, 131, 131, 132, 132])  # a burst of old duplicates in sequence
    tick(*[120, 121, 122] * 3)  # a run shorter than RESTART_RUN, repeated
    tick(150, 149, 152, 151, 154, 153)  # old packets out of order
    for k in range(10):  # old packets in sequence, interleaved with the current stream
        tick(200 + k)
    tick(*range(seq - 10, seq))  # recent packets again (within capacity: duplicates)
    assert InsertResult.RESYNC not in d.results
    assert d.buf.stats().resyncs == 0
    assert played(out) == list(range(300, seq))


def test_stream_across_wraparound_with_late_packets_never_resyncs() -> None:
    d = fast()
    seqs = [seq_add(65300, i) for i in range(500)]
    script: list[tuple[int, ...]] = [(s,) for s in seqs]
    for i in range(10, 490, 10):  # every 10th packet arrives 3 ticks late
        script[i] = tuple(x for x in script[i] if x != seqs[i])
        script[i + 3] = (*script[i + 3], seqs[i])
    out = d.run(script + [()] * 5)
    stats = d.buf.stats()
    assert stats.resyncs == 0 and stats.late > 0  # late at first, until the target grew
    assert set(d.results) == {InsertResult.ACCEPTED, InsertResult.LATE}
    assert stats.played + stats.late == 500  # every packet played or late: none lost to a resync
    got = played(out)
    assert got[-1] == seqs[-1] and 0 in got
    assert all(seq_diff(b, a) > 0 for a, b in itertools.pairwise(got))  # in order across the wrap


def test_reset_starts_a_new_stream() -> None:
    d = fast()
    d.run([(s,) for s in range(10)])
    d.buf.reset()
    assert d.buf.stats() == JitterStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)
    assert d.tick().kind == "empty"
    assert d.tick(500).seq == 500


def test_stats_are_a_snapshot() -> None:
    d = fast()
    d.run([(0,), (1,), ()])
    snapshot = d.buf.stats()
    d.run([(2,)])
    assert snapshot.played == 2
    assert d.buf.stats().played == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.played = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [
        {"capacity": 48},
        {"capacity": 1},
        {"min_delay_frames": 0},
        {"max_delay_frames": 64},
        {"initial_delay_frames": 30},
        {"delay_quantile": 1.0},
        {"forget_factor": 0.0},
        {"frame_ms": 0.0},
        {"catchup_patience": 0},
        {"comfort_noise_codebooks": 0},
    ],
)
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        JitterConfig(**bad)  # type: ignore[arg-type]


def test_insert_rejects_invalid_sequence_numbers() -> None:
    buf = JitterBuffer()
    with pytest.raises(ValueError):
        buf.insert(65536, frame_of(0), 0.0)
