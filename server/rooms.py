"""Voice-call rooms, loop side: `/v1/rooms/{room_id}` sessions, forwarding and events.

A `Room` exists while it has participants (`RoomRegistry.join` creates it, the last `leave`
deletes it).  Each room owns a `RoomMixer` job on the engine worker (server.mixer).

Token packets from `send: "tokens"` participants are validated (`decode_packet`) and
forwarded at once, on the loop, to every other `receive: "tokens"` participant without
decoding: the bytes are copied with the stream id rewritten to the sender's participant id
and, when the times block is present, `server_recv_us` set now and `server_send_us` set by
each receiver's sender task just before its send.  Packets the server encodes for
`send: "pcm"` participants (`RoomSenderJob`) are forwarded the same way.  When somebody
receives PCM, the packets also go to the room mixer.

Real time: each sender has a `RealTimeBudget` (real time plus a burst of `max_backlog_ms`);
input beyond it is dropped and counted (reason `rate`).  Receivers have bounded outboxes
(`send_queue` media messages, oldest dropped, reason `send_queue`).  Events and control
replies (`joined`, `left`, `pong`, `bitrate`) go through the outbox's urgent lane, never
dropped and bounded to `CONTROL_LIMIT` (server.outbox): the receive loop stops reading while
that many replies are owed, and an event that finds the lane full closes the participant
with 4408.  The `end` reply is the outbox's last item: never dropped, and media forwarded
after it are discarded.  Rooms have no idle timeout; after `end` the session keeps reading
(ignoring input) so that a disconnect is noticed.
"""

from __future__ import annotations

import re
import struct
import time
from typing import Any, Final

from starlette.websockets import WebSocket

from server.auth import Lease
from server.codes import CloseCode, SessionError
from server.engine_worker import Fatal, Out
from server.jobs import SERVER_SEND_OFFSET, SetMode
from server.messages import Control, End, Endpoint, Hello, Media, SetBitrate, clock_us, to_text
from server.metrics import Metrics
from server.mixer import MixJoin, MixLeave, MixOut, MixPacket, RoomMixer, RoomSenderJob
from server.outbox import Outbox
from server.session import Session
from server.state import AppState
from streaming.framing import Resampler
from streaming.protocol import FLAG_TIMES, PACKET_HEADER_SIZE, TokenPacket

__all__ = ["ROOM_ID_PATTERN", "RealTimeBudget", "Room", "RoomRegistry", "RoomSession"]

ROOM_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_STREAM_ID: Final = struct.Struct(">I")
_STREAM_ID_OFFSET: Final = 4
_SERVER_RECV_OFFSET: Final = PACKET_HEADER_SIZE + 4


class RealTimeBudget:
    """Token bucket in ms of audio: refills at real time up to `burst_ms`."""

    def __init__(self, burst_ms: float, now: float) -> None:
        self.burst_ms = burst_ms
        self.level = burst_ms
        self.t = now

    def take(self, ms: float, now: float) -> bool:
        """Spend `ms` of audio at time `now` (s); False (nothing spent) when over budget."""
        self.level = min(self.burst_ms, self.level + 1000.0 * (now - self.t))
        self.t = now
        if self.level + 1e-9 < ms:
            return False
        self.level -= ms
        return True


class Room:
    """Participants of one room and its mixer."""

    def __init__(self, room_id: str, state: AppState) -> None:
        self.room_id = room_id
        self.state = state
        self.participants: dict[int, RoomSession] = {}
        self._next_pid = 1
        self.mixer = RoomMixer(state.model, self._mixer_sink)
        self.pcm_listeners = 0
        state.worker.add(self.mixer)

    def add(self, session: RoomSession) -> int:
        """Admit `session`; its participant id.  4409 when the room is full."""
        limit = self.state.settings.room_max_participants
        if len(self.participants) >= limit:
            raise SessionError(
                CloseCode.ROOM_FULL, f"room {self.room_id!r} is full ({limit} participants)"
            )
        pid = self._next_pid
        self._next_pid += 1
        self.participants[pid] = session
        return pid

    def remove(self, pid: int) -> None:
        """Participant `pid` is gone (no event; see `RoomRegistry.leave`)."""
        self.participants.pop(pid, None)

    def broadcast(self, sender: int, message: dict[str, Any]) -> None:
        """Send an event to everyone but `sender`."""
        text = to_text(message)
        for pid, p in self.participants.items():
            if pid != sender:
                p.outbox.put(Out(text), urgent=True)

    def forward(self, sender: int, out: Out) -> None:
        """Queue a token packet (`out.data`, stream id already the sender's) to every other
        participant that receives tokens."""
        for pid, p in self.participants.items():
            if pid != sender and p.receive is Media.TOKENS:
                p.outbox.put(out)

    def forward_packet(self, sender: int, data: bytes, packet: TokenPacket, now: float) -> None:
        """A client's token packet: rewrite stream id (and server_recv), forward, mix."""
        patched = bytearray(data)
        _STREAM_ID.pack_into(patched, _STREAM_ID_OFFSET, sender)
        stamp = -1
        if data[3] & FLAG_TIMES:
            _STREAM_ID.pack_into(patched, _SERVER_RECV_OFFSET, clock_us(now))
            stamp = SERVER_SEND_OFFSET
        self.forward(sender, Out(bytes(patched), stamp=stamp))
        if self.pcm_listeners:
            self.state.worker.submit(self.mixer, MixPacket(sender, packet))

    def _mixer_sink(self, items: list[Any]) -> None:
        for item in items:
            if isinstance(item, MixOut):
                p = self.participants.get(item.pid)
                if p is not None and item.data:
                    p.outbox.put(Out(item.data))
            elif isinstance(item, Fatal):
                for p in list(self.participants.values()):
                    p.close(item.code, f"room mixer failed: {item.reason}")


class RoomRegistry:
    """All rooms of the server (loop-only)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.rooms: dict[str, Room] = {}

    def join(self, room_id: str, session: RoomSession, state: AppState) -> tuple[Room, int]:
        """Add `session` to room `room_id` (created if needed); (room, participant id)."""
        room = self.rooms.get(room_id)
        created = room is None
        if room is None:
            room = Room(room_id, state)
        try:
            pid = room.add(session)
        except SessionError:
            if created:
                state.worker.remove(room.mixer)
            raise
        if created:
            self.rooms[room_id] = room
            self.metrics.rooms_active.inc()
        self.metrics.room_participants.inc()
        return room, pid

    def leave(self, room: Room, pid: int, reason: str, *, announce: bool = True) -> None:
        """Participant `pid` left: event to the others (unless `announce` is False: they
        were never told it joined), mixer told, empty room deleted."""
        if pid not in room.participants:
            return
        room.remove(pid)
        self.metrics.room_participants.dec()
        if announce:
            room.broadcast(pid, {"type": "left", "participant_id": pid, "reason": reason})
        room.state.worker.submit(room.mixer, MixLeave(pid))
        if not room.participants and self.rooms.get(room.room_id) is room:
            del self.rooms[room.room_id]
            room.state.worker.remove(room.mixer)
            self.metrics.rooms_active.dec()


class RoomSession(Session):
    """One participant of `/v1/rooms/{room_id}`."""

    endpoint = Endpoint.ROOM
    idle_timeout = False

    def __init__(self, state: AppState, ws: WebSocket, lease: Lease, room_id: str) -> None:
        super().__init__(state, ws, lease)
        self.room_id = room_id
        self.room: Room | None = None
        self.pid = 0
        self.send = Media.NONE
        self.receive = Media.NONE
        self.job: RoomSenderJob | None = None
        self.budget = RealTimeBudget(self.settings.max_backlog_ms, time.perf_counter())
        self.frames_in = 0
        self._dropped_ms = 0.0
        self._leave_reason = "closed"
        self._announced = False
        """True once the others were told of this participant (`joined`): only then is its
        leaving an event for them."""
        self._dropped = state.metrics.frames_dropped.labels("rate")

    def _make_outbox(self) -> Outbox[Out]:
        dropped = self.state.metrics.frames_dropped.labels("send_queue")
        return Outbox(
            self.settings.send_queue, on_drop=lambda _: dropped.inc(), on_full=self._outbox_full
        )

    async def _serve(self) -> None:
        if not ROOM_ID_PATTERN.fullmatch(self.room_id):
            raise SessionError(
                CloseCode.BAD_REQUEST,
                "room_id must be 1 to 64 characters of A-Z a-z 0-9 _ . -",
            )
        await super()._serve()

    def close(self, code: CloseCode, reason: str) -> None:
        if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY) and not self.closing:
            self._leave_reason = "error"
        super().close(code, reason)

    # ---- start ----------------------------------------------------------------------------

    async def _start(self, hello: Hello) -> None:
        state = self.state
        self.send, self.receive = hello.send, hello.receive
        room, pid = state.rooms.join(self.room_id, self, state)
        self.room, self.pid = room, pid
        if hello.send is Media.PCM:
            self.job = RoomSenderJob(
                state.model,
                self._sender_sink,
                room.mixer,
                pid=pid,
                rate=hello.sample_rate,
                fmt=hello.fmt,
                mode=hello.mode,
                timestamps=hello.timestamps,
                rate_cap=hello.rate_cap,
            )
            state.worker.add(self.job, near=room.mixer)  # it feeds the mixer directly
        if hello.receive is Media.PCM:
            room.pcm_listeners += 1
            state.worker.submit(room.mixer, MixJoin(pid, hello.sample_rate, hello.fmt))
        ready = self._ready_fields(hello)
        ready.update(
            stream_id=pid,
            room_id=self.room_id,
            participant_id=pid,
            send=hello.send.value,
            receive=hello.receive.value,
            name=hello.name,
            tokens="binary",
            return_tokens=False,
            algorithmic_latency_ms=self._latency_ms(hello),
            participants=[p.describe() for q, p in room.participants.items() if q != pid],
        )
        await self._send_ready(ready)
        room.broadcast(pid, {"type": "joined", **self.describe()})
        self._announced = True

    def describe(self) -> dict[str, Any]:
        """This participant as listed in `ready` and `joined`."""
        hello = self.hello
        return {
            "participant_id": self.pid,
            "send": self.send.value,
            "receive": self.receive.value,
            "name": hello.name if hello is not None else "",
        }

    def _latency_ms(self, hello: Hello) -> float:
        card = self.card
        total = 0.0
        if hello.send is Media.PCM:
            total += card.frame_ms + Resampler(hello.sample_rate, card.sample_rate).delay_ms
        if hello.receive is Media.PCM:
            total += card.output_delay_ms + Resampler(card.sample_rate, hello.sample_rate).delay_ms
        return round(total, 4)

    # ---- media ----------------------------------------------------------------------------

    def _on_binary(self, data: bytes) -> None:
        room = self.room
        assert room is not None
        now = time.perf_counter()
        if self.send is Media.TOKENS:
            packet = self._decode_packet(data)
            if not self.budget.take(self.card.frame_ms, now):
                self._drop(self.card.frame_ms)
                return
            self.frames_in += 1
            room.forward_packet(self.pid, data, packet, now)
        elif self.send is Media.PCM:
            ms = self._pcm_ms(data)
            if not data:
                return
            if not self.budget.take(ms, now):
                self._drop(ms)
                return
            assert self.job is not None
            self.state.worker.submit(self.job, bytes(data))
        else:
            raise SessionError(
                CloseCode.UNSUPPORTED_DATA,
                'binary message from a participant with send "none"',
            )

    def _drop(self, ms: float) -> None:
        before = int(self._dropped_ms / self.card.frame_ms)
        self._dropped_ms += ms
        after = int(self._dropped_ms / self.card.frame_ms)
        if after > before:
            self._dropped.inc(after - before)

    def _sender_sink(self, items: list[Any]) -> None:
        room = self.room
        for item in items:
            if isinstance(item, Fatal):
                self.close(item.code, item.reason)
                return
            if room is not None and isinstance(item, Out):
                if isinstance(item.data, bytes):
                    room.forward(self.pid, item)
                else:  # bitrate replies: urgent (never dropped, unlike media)
                    self.outbox.put(item, urgent=True)

    def _on_control(self, control: Control) -> None:
        if isinstance(control, SetBitrate) and self.job is not None:
            self.state.worker.submit(self.job, SetMode(control.mode))
            self._pending_controls += 1  # replied `bitrate` (flow control, server.session)
        elif isinstance(control, End):
            self._leave_reason = "end"
            frames = self.job.frames_out if self.job is not None else self.frames_in
            late = self.job.late_frames if self.job is not None else 0
            self.outbox.put_last(  # never dropped; later media are discarded
                Out(
                    to_text(
                        {
                            "type": "end",
                            "frames": frames,
                            "late_frames": late,
                            "dropped_frames": int(self._dropped_ms / self.card.frame_ms),
                        }
                    ),
                    close=True,
                )
            )
            self._reading = False

    # ---- end ------------------------------------------------------------------------------

    def _cleanup(self) -> None:
        state = self.state
        if self.job is not None:
            state.worker.remove(self.job)
            self.job = None
        room = self.room
        if room is not None:
            if self.receive is Media.PCM:
                room.pcm_listeners -= 1
            state.rooms.leave(room, self.pid, self._leave_reason, announce=self._announced)
            self.room = None
