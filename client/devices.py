"""Sound devices through sounddevice (PortAudio): discovery, clear errors, `DeviceAudio`.

`DeviceAudio` opens one input and one output stream (they may be different devices with
different clocks) whose callbacks only copy between the PortAudio buffers and two
preallocated rings (`client.audio.LockedRing`), record a (position, time) mark and set an
event; they never block on computation and never allocate buffers.  Device-level glitches
(PortAudio's input overflow / output underflow flags) and ring over/underruns are counted.

Every failure to find or open a device becomes a `ClientError` with exit code 2 and one line
naming what was looked for; a device name that matches several devices lists them (index,
name, host API) and says how to pick one.
"""

from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from client.audio import AudioCounters, LockedRing, TimeMark
from client.errors import EXIT_USAGE, ClientError
from streaming.framing import SUPPORTED_RATES

__all__ = [
    "DeviceAudio",
    "describe_devices",
    "load_sounddevice",
    "matching_devices",
    "resolve_device",
]

F32: TypeAlias = npt.NDArray[np.float32]
DeviceSpec: TypeAlias = int | str | None


def load_sounddevice() -> ModuleType:
    """Import sounddevice; ClientError (exit 2) when PortAudio is not installed."""
    try:
        import sounddevice as sd
    except OSError as exc:  # the PortAudio shared library is missing
        raise ClientError(
            f"no sound support: {exc} (install libportaudio2)", exit_code=EXIT_USAGE
        ) from None
    module: ModuleType = sd
    return module


def _parse_spec(spec: str | None) -> DeviceSpec:
    """A device index when `spec` is a number, else the name substring (or None)."""
    if spec is None or spec == "":
        return None
    return int(spec) if spec.strip().isdigit() else spec


def _host_apis(sd: ModuleType) -> str:
    try:
        return ", ".join(str(api["name"]) for api in sd.query_hostapis()) or "none"
    except sd.PortAudioError:
        return "unknown"


def describe_devices(sd: ModuleType) -> str:
    """The device list as sounddevice prints it (`>`/`<` mark the default input/output);
    ClientError (exit 2) when there is none."""
    try:
        devices = sd.query_devices()
    except sd.PortAudioError as exc:
        raise ClientError(f"cannot list sound devices: {exc}", exit_code=EXIT_USAGE) from None
    if len(devices) == 0:
        raise ClientError(
            f"no sound device: PortAudio found none (host APIs: {_host_apis(sd)})",
            exit_code=EXIT_USAGE,
        )
    return str(devices)


def matching_devices(sd: ModuleType, query: str, kind: str) -> list[tuple[int, str, str]]:
    """(index, name, host API) of the `kind` ('input' or 'output') devices `query` names,
    by sounddevice's rule: its words appear, in order and ignoring case, in "name, host API";
    of several matches, the one device whose name (or "name, host API") is exactly `query`
    wins.  PortAudioError when the devices cannot be listed."""
    channels = f"max_{kind}_channels"
    words = query.lower().split()
    matches: list[tuple[int, str, str]] = []
    exact: list[tuple[int, str, str]] = []
    for index, info in enumerate(sd.query_devices()):
        if info[channels] < 1:
            continue
        name, api = str(info["name"]), str(sd.query_hostapis(info["hostapi"])["name"])
        full = f"{name}, {api}".lower()
        if _words_in_order(words, full):
            matches.append((index, name, api))
            if query.lower() in (name.lower(), full):
                exact.append((index, name, api))
    return exact if len(matches) > 1 and len(exact) == 1 else matches


def _words_in_order(words: list[str], text: str) -> bool:
    """True when every one of `words` occurs in `text`, each after the previous one."""
    pos = 0
    for word in words:
        pos = text.find(word, pos)
        if pos < 0:
            return False
        pos += len(word)
    return True


def _ambiguous(spec: str, kind: str, matches: list[tuple[int, str, str]]) -> ClientError:
    """The usage error (exit 2) of a device name that matches several devices."""
    listed = ", ".join(f"[{index}] {name!r} ({api})" for index, name, api in matches)
    first = matches[0][0]
    return ClientError(
        f"{kind} device {spec!r} is ambiguous: it matches {len(matches)} {kind} devices: "
        f"{listed}; pick one by its index (e.g. --{kind}-device {first}) or by more of its name",
        exit_code=EXIT_USAGE,
    )


def _by_name(sd: ModuleType, spec: str, kind: str) -> int | None:
    """The index of the one `kind` device `spec` names; None when none does; ClientError
    (exit 2) when several do."""
    matches = matching_devices(sd, spec, kind)
    if len(matches) > 1:
        raise _ambiguous(spec, kind, matches)
    return matches[0][0] if matches else None


def resolve_device(sd: ModuleType, spec: str | None, kind: str) -> tuple[int, str]:
    """(index, name) of the `kind` ('input' or 'output') device `spec` (index, name
    substring, or None for the default); ClientError (exit 2) naming what was looked for,
    or listing the devices a name matches when it matches several (`matching_devices`)."""
    wanted = _parse_spec(spec)
    what = f"{kind} device {spec!r}" if wanted is not None else f"a default {kind} device"
    try:
        if isinstance(wanted, str):
            index = _by_name(sd, wanted, kind)
            if index is None:
                raise ValueError(f"no {kind} device matches {wanted!r}")
            wanted = index
        info: Any = sd.query_devices(wanted, kind)
    except (sd.PortAudioError, ValueError) as exc:
        raise ClientError(
            f"no sound device: looked for {what} with PortAudio (host APIs: "
            f"{_host_apis(sd)}) and found none ({exc}); see `codec-client call --list-devices`",
            exit_code=EXIT_USAGE,
        ) from None
    channels = info["max_input_channels" if kind == "input" else "max_output_channels"]
    if channels < 1:
        raise ClientError(
            f"no sound device: {info['name']!r} has no {kind} channels", exit_code=EXIT_USAGE
        )
    return int(info["index"]), str(info["name"])


def pick_rate(sd: ModuleType, input_index: int, output_index: int, preferred: int) -> int:
    """The first of `preferred`, 48000, 16000, ... that both devices accept (mono float32)."""
    order = [preferred] + [r for r in (48000, 16000, 24000, 8000) if r != preferred]
    for rate in order:
        if rate not in SUPPORTED_RATES:
            continue
        try:
            sd.check_input_settings(input_index, channels=1, dtype="float32", samplerate=rate)
            sd.check_output_settings(output_index, channels=1, dtype="float32", samplerate=rate)
        except (sd.PortAudioError, ValueError):
            continue
        return rate
    raise ClientError(
        f"no sound device: devices {input_index}/{output_index} accept none of the rates "
        f"{SUPPORTED_RATES} Hz (mono float32)",
        exit_code=EXIT_USAGE,
    )


class DeviceAudio:
    """Capture from `input_device` and play to `output_device` (indices) at `rate` Hz.

    * `block`: samples per callback (PortAudio block size);
    * `capture_ms`, `playback_ms`: capacities of the two rings, ms;
    * `latency`: PortAudio's suggested latency ('low', 'high' or seconds).
    `data_ready` is set by the input callback, `space_ready` by the output callback.
    """

    def __init__(
        self,
        sd: ModuleType,
        input_device: int,
        output_device: int,
        rate: int,
        *,
        block: int,
        capture_ms: float = 1000.0,
        playback_ms: float = 1000.0,
        latency: str | float = "low",
    ) -> None:
        self._sd = sd
        self._rate = rate
        self.block = block
        self.capture = LockedRing(int(rate * capture_ms / 1000))
        self.playback = LockedRing(int(rate * playback_ms / 1000))
        self.capture_mark = TimeMark()
        self.play_mark = TimeMark()
        self.data_ready = threading.Event()
        self.space_ready = threading.Event()
        self._in_flags = 0
        self._out_flags = 0
        self._cap_read = 0
        self._in_stream: Any = None
        self._out_stream: Any = None
        try:
            self._in_stream = sd.InputStream(
                samplerate=rate,
                blocksize=block,
                device=input_device,
                channels=1,
                dtype="float32",
                latency=latency,
                callback=self._on_input,
            )
            self._out_stream = sd.OutputStream(
                samplerate=rate,
                blocksize=block,
                device=output_device,
                channels=1,
                dtype="float32",
                latency=latency,
                callback=self._on_output,
            )
        except (sd.PortAudioError, ValueError) as exc:
            self.close()
            raise ClientError(
                f"no sound device: cannot open input {input_device} / output {output_device} "
                f"at {rate} Hz ({exc})",
                exit_code=EXIT_USAGE,
            ) from None

    # ---- callbacks (PortAudio thread: copy, mark, signal; nothing else) -------------------

    def _on_input(self, indata: Any, frames: int, ctime: Any, status: Any) -> None:
        if status:
            self._in_flags += 1
        self.capture.write(indata[:, 0])
        # the last sample of this block was captured at the ADC time of the block's end
        adc = time.perf_counter() + ctime.inputBufferAdcTime - ctime.currentTime
        self.capture_mark.set(self.capture.total_in, adc + frames / self._rate)
        self.data_ready.set()

    def _on_output(self, outdata: Any, frames: int, ctime: Any, status: Any) -> None:
        if status:
            self._out_flags += 1
        start = self.playback.total_out
        if self.playback.total_in:
            self.playback.read_into(outdata[:, 0], pad=True)
        else:  # nothing to play yet: silence, not an underrun
            outdata.fill(0.0)
        dac = time.perf_counter() + ctime.outputBufferDacTime - ctime.currentTime
        self.play_mark.set(start, dac)
        self.space_ready.set()

    # ---- AudioPort ------------------------------------------------------------------------

    @property
    def rate(self) -> int:
        """Device sample rate, Hz."""
        return self._rate

    @property
    def capture_available(self) -> int:
        """Captured samples waiting."""
        return self.capture.available

    def read_capture(self, out: F32) -> tuple[int, float]:
        """Move captured samples into `out`; (count, capture time of the first one, s)."""
        first = self._cap_read
        n = self.capture.read_into(out)
        self._cap_read += n
        mark = self.capture_mark.get()
        if mark is None:
            return n, time.perf_counter()
        position, t = mark
        return n, t - (position - first) / self._rate

    @property
    def playback_queued(self) -> int:
        """Samples queued for playback."""
        return self.playback.available

    @property
    def playback_written(self) -> int:
        """Cumulative samples written for playback."""
        return self.playback.total_in

    def write_playback(self, samples: F32) -> int:
        """Queue samples for playback."""
        return self.playback.write(samples)

    def played_time(self, position: int) -> float | None:
        """Estimated playout time of write position `position` (from the last callback)."""
        mark = self.play_mark.get()
        if mark is None:
            return None
        start, dac = mark
        return dac + (position - start) / self._rate

    def counters(self) -> AudioCounters:
        """Glitch counters."""
        return AudioCounters(
            input_overflows=self._in_flags,
            output_underflows=self._out_flags,
            capture_dropped=self.capture.overflow,
            playback_underrun=self.playback.underrun,
            playback_dropped=self.playback.overflow,
        )

    # ---- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Start both streams."""
        try:
            self._out_stream.start()
            self._in_stream.start()
        except self._sd.PortAudioError as exc:
            raise ClientError(
                f"no sound device: cannot start audio ({exc})", exit_code=EXIT_USAGE
            ) from None

    def close(self) -> None:
        """Stop and close both streams (idempotent)."""
        for stream in (self._in_stream, self._out_stream):
            if stream is not None:
                try:
                    stream.abort()
                    stream.close()
                except self._sd.PortAudioError:
                    pass
        self._in_stream = self._out_stream = None
        self.data_ready.set()
        self.space_ready.set()

    @property
    def latency_s(self) -> tuple[float, float]:
        """PortAudio's (input, output) latency, s (0 when closed)."""
        if self._in_stream is None or self._out_stream is None:
            return 0.0, 0.0
        return float(self._in_stream.latency), float(self._out_stream.latency)
