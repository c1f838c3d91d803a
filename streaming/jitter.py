"""Adaptive jitter buffer with loss concealment for decoding token streams.

One `JitterBuffer` per received stream.  The network side calls `insert` for every packet
(sequence number, frame, arrival time `now` in seconds from any monotonic clock the caller
owns; there is no clock in here); the audio side calls `pop` once per playout tick (one frame
= `frame_ms`, 20 ms) and always gets exactly one `PlayoutItem` to feed the decoder:

* `frame`: the real frame for this tick;
* `concealed`: the frame was missing: the last frame repeated with its gain lowered by
  `conceal_fade_db` (3 dB) per missing frame, for the first `conceal_frames` (3) ticks of a gap;
* `comfort_noise`: a longer gap: the first `comfort_noise_codebooks` codes of the last frame at
  a low gain (at most `comfort_noise_gain`, still fading);
* `empty`: nothing to play yet (before the first packet and while the initial target delay
  fills up): the caller outputs silence and does not step the decoder.

Sizes and delays are counted in frames (sequence numbers, u16 with wraparound).

Delay adaptation follows the idea of WebRTC NetEq's delay manager: for every packet the
arrival delay relative to its nominal send time (`now` minus the unwrapped capture timestamp,
or minus `seq × frame` when the stream has no timestamps) is taken relative to the smallest
such delay of the last `delay_window` packets; that relative delay, rounded up to whole
frames, goes into an exponentially forgetting histogram; the target delay is a high quantile
of it (`delay_quantile`) + 1 frame, clamped to [`min_delay_frames`, `max_delay_frames`].

The buffered span (frames from the playout point to the newest packet, holes included) is
steered towards the target with whole frames, the only unit a token stream has:

* grow: when the next frame is missing and the span is at most the target (an underrun, or a
  hole with little behind it), the playout point holds: the tick is concealed and the frame
  may still arrive and play, one frame later than planned;
* declare lost: when the next frame is missing and more than the target is buffered behind
  it, the frame is skipped (`lost`); ticks already concealed while holding stand for missing
  frames, so after an outage playout resumes with the first frame that arrived;
* shrink (catch-up): when the span stays above target + `catchup_margin_frames` for
  `catchup_patience` consecutive ticks, up to `catchup_max_drop` frames are discarded
  (`dropped`), never going below the target.

Resync: a packet at least `capacity` frames ahead of the playout point flushes the buffer
and playout restarts at it (a long outage, or a sender that restarted its sequence numbers
at a value "ahead").  A sender that restarts *behind* (e.g. back to 0 early in a stream)
sends packets that are all at least `capacity` frames behind the playout point; one such
packet is only very late (ignored as `late`), but `RESTART_RUN` (4) of them in a row, each
the sequence number after the previous one, with no packet near the playout point in
between, are a new numbering: the last of them resyncs the buffer like a jump ahead (the
first three frames of the restarted stream are lost, 60 ms).  Old packets repeated or
arriving out of order never form such a run; what the rule cannot tell from a restart is
four or more consecutive packets, each delayed by more than `capacity` frames (1.28 s)
beyond newer ones, with nothing newer in between.

All storage is preallocated: `capacity` slots (a power of two, frames), a fixed ring of
delays and a fixed histogram; nothing grows with the stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

import numpy as np

from streaming.protocol import TokenFrame, TokenPacket, seq_add, seq_diff, ts_diff

__all__ = [
    "RESTART_RUN",
    "InsertResult",
    "JitterBuffer",
    "JitterConfig",
    "JitterStats",
    "PlayoutItem",
    "PlayoutKind",
]


RESTART_RUN: Final = 4
"""Consecutive packets (each seq = the previous one + 1), all at least `capacity` frames
behind the playout point, that make a restarted sender: the last one resyncs the buffer.
One or two far-behind packets are plausible stragglers; four in sequence (80 ms of a
stream) with nothing current in between are not."""


class PlayoutKind(StrEnum):
    """What a playout tick produced."""

    FRAME = "frame"
    CONCEALED = "concealed"
    COMFORT_NOISE = "comfort_noise"
    EMPTY = "empty"


class InsertResult(StrEnum):
    """What `JitterBuffer.insert` did with a packet."""

    ACCEPTED = "accepted"
    """Stored for playout."""
    DUPLICATE = "duplicate"
    """The same sequence number is buffered or was already played: ignored."""
    LATE = "late"
    """Its playout tick has passed (played as concealment or skipped): ignored."""
    RESYNC = "resync"
    """At least `capacity` frames ahead of the playout point, or the `RESTART_RUN`-th
    consecutive packet at least `capacity` frames behind it: the buffer was flushed and
    playout restarts at this packet (a long outage or a restarted sender)."""


@dataclass(frozen=True, slots=True)
class PlayoutItem:
    """The result of one playout tick (one frame, 20 ms).

    * `kind`: see `PlayoutKind`.
    * `frame`: the frame to decode; None only for `empty`.
    * `seq`: the sequence number this tick stands for (the missing one for concealment);
      None for `empty`.
    * `timestamp_us`: capture timestamp (µs, u32) of a real frame when given to `insert`.
    * `arrival`: arrival time (s, the caller's clock) of a real frame.
    """

    kind: PlayoutKind
    frame: TokenFrame | None = None
    seq: int | None = None
    timestamp_us: int | None = None
    arrival: float | None = None


_EMPTY: Final = PlayoutItem(PlayoutKind.EMPTY)


@dataclass(frozen=True, slots=True)
class JitterConfig:
    """Tuning of a `JitterBuffer` (delays in frames, gains in dB or gain-index steps).

    * `frame_ms`: frame duration in ms (20.0).
    * `capacity`: slots, a power of two (64 = 1.28 s); packets further ahead cause a resync.
    * `min_delay_frames`, `max_delay_frames`: clamp of the target delay (max < capacity).
    * `initial_delay_frames`: target before any jitter was measured; playout starts once
      this many frames (span from the oldest to the newest) are buffered.
    * `delay_quantile`: quantile of the relative-delay histogram the target covers (0.95).
    * `forget_factor`: per-packet decay of the histogram (0.997 ≈ 330 packets ≈ 6.7 s memory).
    * `delay_window`: packets over which the fastest arrival is the reference (100 ≈ 2 s).
    * `catchup_margin_frames`, `catchup_patience`: catch up when the buffered span exceeds
      target + margin for `catchup_patience` consecutive ticks ...
    * `catchup_max_drop`: ... by discarding up to this many frames (never below target).
    * `conceal_frames`: missing frames played as `concealed` before `comfort_noise`.
    * `conceal_fade_db`: gain reduction per consecutive missing frame, dB (3.0).
    * `gain_step_db`: dB per gain-index step, from the model card (`gain.step_db`, 1.5).
    * `comfort_noise_gain`: highest gain index of comfort noise (20 ≈ -60 dB on the default
      card, whose index 0 is -90 dB).
    * `comfort_noise_codebooks`: codebooks kept in comfort-noise frames (1: coarse envelope).
    """

    frame_ms: float = 20.0
    capacity: int = 64
    min_delay_frames: int = 1
    max_delay_frames: int = 25
    initial_delay_frames: int = 2
    delay_quantile: float = 0.95
    forget_factor: float = 0.997
    delay_window: int = 100
    catchup_margin_frames: int = 2
    catchup_patience: int = 10
    catchup_max_drop: int = 1
    conceal_frames: int = 3
    conceal_fade_db: float = 3.0
    gain_step_db: float = 1.5
    comfort_noise_gain: int = 20
    comfort_noise_codebooks: int = 1

    def __post_init__(self) -> None:
        cap = self.capacity
        if cap < 2 or cap & (cap - 1):
            raise ValueError(f"capacity must be a power of two >= 2, got {cap}")
        if not 1 <= self.min_delay_frames <= self.max_delay_frames < cap:
            raise ValueError("need 1 <= min_delay_frames <= max_delay_frames < capacity")
        if not self.min_delay_frames <= self.initial_delay_frames <= self.max_delay_frames:
            raise ValueError("initial_delay_frames must lie in [min, max]_delay_frames")
        if not 0.0 < self.delay_quantile < 1.0 or not 0.0 < self.forget_factor < 1.0:
            raise ValueError("delay_quantile and forget_factor must lie in (0, 1)")
        if self.frame_ms <= 0 or self.gain_step_db <= 0 or self.conceal_fade_db < 0:
            raise ValueError("frame_ms and gain_step_db must be > 0, conceal_fade_db >= 0")
        if self.delay_window < 1 or self.catchup_patience < 1 or self.catchup_max_drop < 1:
            raise ValueError("delay_window, catchup_patience, catchup_max_drop must be >= 1")
        if self.catchup_margin_frames < 0 or self.conceal_frames < 0:
            raise ValueError("catchup_margin_frames and conceal_frames must be >= 0")
        if self.comfort_noise_gain < 0 or self.comfort_noise_codebooks < 1:
            raise ValueError("comfort_noise_gain must be >= 0, comfort_noise_codebooks >= 1")


@dataclass(frozen=True, slots=True)
class JitterStats:
    """Counters of a `JitterBuffer` (packets / ticks) and its delays (frames).

    * `received`: `insert` calls; `duplicate` and `late` ones were ignored.
    * `played`: ticks that returned a real frame.
    * `lost`: sequence numbers whose tick passed without the packet (skipped).
    * `concealed`, `comfort_noise`, `empty`: ticks of each kind.
    * `dropped`: frames discarded by catch-up; `flushed`: frames discarded by resyncs;
      `resyncs`: times the buffer restarted on a packet too far ahead (or on a restarted
      sender's `RESTART_RUN` packets far behind).
    * `current_delay`: frames buffered from the playout point to the newest packet (span,
      holes included); `target_delay`: the adaptive target.
    """

    received: int
    played: int
    late: int
    duplicate: int
    lost: int
    concealed: int
    comfort_noise: int
    empty: int
    dropped: int
    flushed: int
    resyncs: int
    current_delay: int
    target_delay: int


class _Slot(IntEnum):
    EMPTY = 0
    BUFFERED = 1
    CONSUMED = 2  # played or dropped: a new arrival is a duplicate
    MISSED = 3  # its tick passed without it: a new arrival is late


class JitterBuffer:
    """Reorders, de-duplicates and paces frames of one stream; conceals losses.

    Not thread-safe: call `insert` and `pop` from one thread or event loop.
    """

    def __init__(self, config: JitterConfig | None = None) -> None:
        self.config = config or JitterConfig()
        cfg = self.config
        cap = cfg.capacity
        self._mask = cap - 1
        self._frame_s = cfg.frame_ms / 1000.0
        # playout slots, indexed by seq & mask (capacity divides 2**16, so wraparound is safe)
        self._slot_seq: list[int] = [-1] * cap
        self._slot_state: list[int] = [_Slot.EMPTY] * cap
        self._slot_frame: list[TokenFrame | None] = [None] * cap
        self._slot_ts: list[int | None] = [None] * cap
        self._slot_arrival: list[float] = [0.0] * cap
        # delay estimator
        self._delays = np.empty(cfg.delay_window, dtype=np.float64)
        self._hist = np.empty(cfg.max_delay_frames + 1, dtype=np.float64)
        self._cum = np.empty_like(self._hist)
        self.reset()

    # ---------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget everything (a new stream): empty slots, initial target, zero counters."""
        cap = self.config.capacity
        for i in range(cap):
            self._slot_seq[i] = -1
            self._slot_state[i] = _Slot.EMPTY
            self._slot_frame[i] = None
        self._have_any = False
        self._started = False
        self._next = 0  # sequence number of the next tick
        self._max = 0  # newest sequence number received
        self._last: TokenFrame | None = None
        self._gap = 0  # consecutive ticks without a real frame
        self._held = 0  # underrun ticks that did not advance the playout point
        self._above = 0  # consecutive ticks with the span above target + margin
        self._use_ts = False  # pace by capture timestamps (set by the first packet)
        self._run = 0  # consecutive far-behind packets in sequence (a restarted sender?)
        self._run_seq = 0  # seq of the last of them
        self._reset_reference()
        self._hist.fill(0.0)
        self._hist[self.config.initial_delay_frames - 1] = 1.0
        self._target = self.config.initial_delay_frames
        self._received = self._played = self._late = self._duplicate = 0
        self._lost = self._concealed = self._comfort = self._empty = 0
        self._dropped = self._flushed = self._resyncs = 0

    def _reset_reference(self) -> None:
        self._ref_valid = False
        self._ref_key = 0  # newest seq (or timestamp) seen, and its unwrapped value
        self._ref_ext = 0
        self._delays.fill(math.inf)
        self._delay_pos = 0

    @property
    def started(self) -> bool:
        """True once playout has begun (the initial target delay was buffered)."""
        return self._started

    @property
    def target_delay(self) -> int:
        """Adaptive target delay, frames."""
        return self._target

    @property
    def current_delay(self) -> int:
        """Frames from the playout point to the newest packet received (0 when empty)."""
        if not self._have_any:
            return 0
        d = seq_diff(self._max, self._next)
        return d + 1 if d >= 0 else 0

    def stats(self) -> JitterStats:
        """Snapshot of the counters."""
        return JitterStats(
            received=self._received,
            played=self._played,
            late=self._late,
            duplicate=self._duplicate,
            lost=self._lost,
            concealed=self._concealed,
            comfort_noise=self._comfort,
            empty=self._empty,
            dropped=self._dropped,
            flushed=self._flushed,
            resyncs=self._resyncs,
            current_delay=self.current_delay,
            target_delay=self._target,
        )

    # ---------------------------------------------------------------- insert

    def push(self, packet: TokenPacket, now: float) -> InsertResult:
        """`insert` the frame of a decoded `TokenPacket` arrived at `now` (s)."""
        return self.insert(packet.seq, packet.frame, now, timestamp_us=packet.timestamp_us)

    def insert(
        self, seq: int, frame: TokenFrame, now: float, *, timestamp_us: int | None = None
    ) -> InsertResult:
        """Offer one frame with sequence number `seq` (u16) that arrived at `now` seconds.

        `timestamp_us` is the packet's capture timestamp (u32 µs, sender clock).  If the
        stream's first packet has one, the delay estimator places packets on the sender's
        timeline by it (robust to sender pauses); otherwise by `seq × frame_ms`.  It is also
        passed through to the `PlayoutItem` for latency profiling.  Playout order always
        follows `seq`.
        """
        if not 0 <= seq <= 0xFFFF:
            raise ValueError(f"seq must be in 0..65535, got {seq}")
        self._received += 1
        if not self._have_any:
            self._have_any = True
            self._next = self._max = seq
            self._use_ts = timestamp_us is not None
            self._reset_reference()
            self._observe(seq, now, timestamp_us)
            self._store(seq, frame, now, timestamp_us)
            return InsertResult.ACCEPTED
        cap = self.config.capacity
        idx = seq & self._mask
        ahead = seq_diff(seq, self._next)
        if ahead < 0:
            if self._started or seq_diff(self._max, seq) >= cap:
                if self._restarted(seq):
                    return self._restart_at(seq, frame, now, timestamp_us)
                return self._reject_behind(seq, idx, now, timestamp_us)
            self._next = seq  # before playout starts, the oldest packet defines the start
        elif ahead >= cap:
            return self._restart_at(seq, frame, now, timestamp_us)
        self._run = 0  # a packet near the playout point: the current numbering is alive
        if self._slot_seq[idx] == seq and self._slot_state[idx] == _Slot.BUFFERED:
            self._duplicate += 1
            return InsertResult.DUPLICATE
        self._observe(seq, now, timestamp_us)
        self._store(seq, frame, now, timestamp_us)
        return InsertResult.ACCEPTED

    def _restarted(self, seq: int) -> bool:
        """Track runs of far-behind packets; True when `seq` completes `RESTART_RUN` of them.

        Far behind: at least `capacity` frames behind the playout point (before playout
        starts: behind the newest packet).  A run continues only with the next sequence
        number; a repeat of the run's last packet leaves it as it is (duplicates never
        extend it), a packet near the playout point ends it (see `insert`).
        """
        base = self._next if self._started else self._max
        if seq_diff(seq, base) > -self.config.capacity:
            self._run = 0  # only late: the current numbering is alive
            return False
        if self._run and seq == self._run_seq:
            return False
        self._run = self._run + 1 if self._run and seq == seq_add(self._run_seq, 1) else 1
        self._run_seq = seq
        return self._run >= RESTART_RUN

    def _restart_at(
        self, seq: int, frame: TokenFrame, now: float, timestamp_us: int | None
    ) -> InsertResult:
        """Flush the buffer and restart playout at this packet (`InsertResult.RESYNC`)."""
        self._resync(seq)
        self._observe(seq, now, timestamp_us)
        self._store(seq, frame, now, timestamp_us)
        return InsertResult.RESYNC

    def _reject_behind(
        self, seq: int, idx: int, now: float, timestamp_us: int | None
    ) -> InsertResult:
        if self._slot_seq[idx] == seq and self._slot_state[idx] == _Slot.CONSUMED:
            self._duplicate += 1
            return InsertResult.DUPLICATE
        self._late += 1
        self._observe(seq, now, timestamp_us)  # lateness is the jitter the target must cover
        return InsertResult.LATE

    def _store(self, seq: int, frame: TokenFrame, now: float, timestamp_us: int | None) -> None:
        idx = seq & self._mask
        self._slot_seq[idx] = seq
        self._slot_state[idx] = _Slot.BUFFERED
        self._slot_frame[idx] = frame
        self._slot_ts[idx] = timestamp_us
        self._slot_arrival[idx] = now
        if seq_diff(seq, self._max) > 0:
            self._max = seq

    def _resync(self, seq: int) -> None:
        for i in range(self.config.capacity):
            if self._slot_state[i] == _Slot.BUFFERED:
                self._flushed += 1
            self._slot_seq[i] = -1
            self._slot_state[i] = _Slot.EMPTY
            self._slot_frame[i] = None
        self._resyncs += 1
        self._next = self._max = seq
        self._held = self._above = self._run = 0
        self._reset_reference()

    def _observe(self, seq: int, now: float, timestamp_us: int | None) -> None:
        """Feed one arrival to the delay estimator and update the target delay.

        The nominal send time of a packet is its capture timestamp (unwrapped, µs) when the
        stream carries them, else `seq × frame` (unwrapped): timestamps keep the estimate
        right across sender pauses that do not advance the sequence number.
        """
        cfg = self.config
        if self._use_ts:
            if timestamp_us is None:
                return  # cannot be placed on the sender's timeline
            key, scale = timestamp_us, 1e-6
        else:
            key, scale = seq, self._frame_s
        if not self._ref_valid:
            self._ref_valid, self._ref_key, self._ref_ext = True, key, 0
        step = ts_diff(key, self._ref_key) if self._use_ts else seq_diff(key, self._ref_key)
        ext = self._ref_ext + step
        if step > 0:
            self._ref_ext, self._ref_key = ext, key
        delay = now - ext * scale
        self._delays[self._delay_pos] = delay
        self._delay_pos = (self._delay_pos + 1) % cfg.delay_window
        relative = (delay - float(self._delays.min())) / self._frame_s
        last_bin = self._hist.shape[0] - 1
        bin_ = min(max(math.ceil(relative - 1e-6), 0), last_bin)
        self._hist *= cfg.forget_factor
        self._hist[bin_] += 1.0 - cfg.forget_factor
        np.cumsum(self._hist, out=self._cum)
        quantile_bin = int(np.searchsorted(self._cum, cfg.delay_quantile * self._cum[-1]))
        self._target = min(max(quantile_bin + 1, cfg.min_delay_frames), cfg.max_delay_frames)

    # ---------------------------------------------------------------- playout

    def _buffered(self, seq: int) -> bool:
        idx = seq & self._mask
        return self._slot_seq[idx] == seq and self._slot_state[idx] == _Slot.BUFFERED

    def _consume(self, seq: int, state: _Slot) -> TokenFrame | None:
        """Mark `seq` consumed or missed, advance the playout point; return its frame."""
        idx = seq & self._mask
        frame = self._slot_frame[idx] if self._slot_state[idx] == _Slot.BUFFERED else None
        self._slot_seq[idx] = seq
        self._slot_state[idx] = state
        self._slot_frame[idx] = None
        self._next = seq_add(seq, 1)
        return frame

    def pop(self) -> PlayoutItem:
        """Produce the item of one playout tick (call exactly once per `frame_ms`)."""
        cfg = self.config
        if not self._have_any:
            self._empty += 1
            return _EMPTY
        if not self._started:
            if self.current_delay < self._target:
                self._empty += 1
                return _EMPTY
            self._started = True
        self._catch_up()
        seq = self._next
        if not self._buffered(seq):
            if self.current_delay <= self._target:
                # underrun, or a hole while below target: hold the playout point (the packet
                # may only be late); the concealed tick adds one frame of delay
                self._gap += 1
                self._held = min(self._held + 1, cfg.capacity)
                return self._conceal(seq)
            # enough is buffered behind the hole: declare missing frames lost.  Ticks already
            # concealed while holding stand for missing frames, so skip that many holes first
            while self._held and self.current_delay and not self._buffered(self._next):
                self._consume(self._next, _Slot.MISSED)
                self._lost += 1
                self._held -= 1
            seq = self._next
            if not self._buffered(seq):
                self._consume(seq, _Slot.MISSED)
                self._lost += 1
                self._gap += 1
                return self._conceal(seq)
        idx = seq & self._mask
        ts, arrival = self._slot_ts[idx], self._slot_arrival[idx]
        frame = self._consume(seq, _Slot.CONSUMED)
        assert frame is not None
        self._last = frame
        self._gap = self._held = 0
        self._played += 1
        return PlayoutItem(PlayoutKind.FRAME, frame, seq, ts, arrival)

    def _catch_up(self) -> None:
        cfg = self.config
        level = self.current_delay
        if level <= self._target + cfg.catchup_margin_frames:
            self._above = 0
            return
        self._above += 1
        if self._above < cfg.catchup_patience:
            return
        self._above = 0
        for _ in range(min(cfg.catchup_max_drop, level - self._target)):
            seq = self._next
            if self._buffered(seq):
                self._consume(seq, _Slot.CONSUMED)
                self._dropped += 1
            else:
                self._consume(seq, _Slot.MISSED)
                self._lost += 1

    def _conceal(self, seq: int) -> PlayoutItem:
        cfg = self.config
        last = self._last
        if last is None:  # cannot happen once started; be safe rather than crash playout
            self._empty += 1
            return _EMPTY
        steps = round(self._gap * cfg.conceal_fade_db / cfg.gain_step_db)
        gain = max(last.gain_index - steps, 0)
        if self._gap <= cfg.conceal_frames:
            self._concealed += 1
            frame = TokenFrame(last.num_codebooks, gain, last.codes)
            return PlayoutItem(PlayoutKind.CONCEALED, frame, seq)
        self._comfort += 1
        keep = min(cfg.comfort_noise_codebooks, last.num_codebooks)
        frame = TokenFrame(keep, min(gain, cfg.comfort_noise_gain), last.codes[:keep])
        return PlayoutItem(PlayoutKind.COMFORT_NOISE, frame, seq)
