"""A private PulseAudio daemon with null sinks: a real audio loopback for sounddevice.

`PulseAudio.start(root)` runs `pulseaudio` as a user daemon (no system instance, no D-Bus,
no shared memory, never exits when idle) with its runtime directory, state and HOME inside
`root`, and loads only the modules the tests need:

    rec      null sink, stereo float32 16 kHz, the recorder taps `rec.monitor`
    a        remap sink -> rec left:  the player plays the speech here; the talking
             client's microphone is `a.monitor`
    b        remap sink -> rec right: the listening client's speaker
    void     null sink: the talking client's speaker (discarded)
    quiet    null source: the listening client's microphone (silence)

One recording of `rec.monitor` therefore holds, sample-locked, what entered the talker's
microphone (left) and what came out of the listener's speaker (right).

sounddevice reaches the daemon through ALSA's `pulse` plugin (libasound2-plugins):
`$HOME/.asoundrc` defines the ALSA devices `cs_mic_a`, `cs_spk_b`, `cs_quiet`, `cs_void` (and
makes `pulse` the default).  Processes get the environment in `env` (HOME, runtime path).
Null sinks are loaded with `norewinds=1`: a rewind of a monitored sink would otherwise drop
the start of a stream that begins while the monitor records.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SPEC = "rate=16000 format=float32le"
MODULES = (
    "module-native-protocol-unix auth-anonymous=1",
    f"module-null-sink sink_name=rec channels=2 {SPEC} norewinds=1",
    "module-remap-sink sink_name=a master=rec channels=1 master_channel_map=front-left "
    "channel_map=mono remix=no",
    "module-remap-sink sink_name=b master=rec channels=1 master_channel_map=front-right "
    "channel_map=mono remix=no",
    f"module-null-sink sink_name=void channels=1 {SPEC} norewinds=1",
    f"module-null-source source_name=quiet channels=1 {SPEC}",
)
ASOUNDRC = """\
pcm.!default { type pulse }
ctl.!default { type pulse }
pcm.cs_mic_a { type pulse device "a.monitor" }
pcm.cs_spk_b { type pulse device "b" }
pcm.cs_quiet { type pulse device "quiet" }
pcm.cs_void { type pulse device "void" }
"""
_DROP = (
    "PULSE_SERVER",
    "PULSE_SINK",
    "PULSE_SOURCE",
    "DBUS_SESSION_BUS_ADDRESS",
    "DISPLAY",
    "ALSA_CONFIG_PATH",
    "XDG_CONFIG_HOME",
)


class PulseError(RuntimeError):
    """The daemon could not be started (the message holds its log)."""


@dataclass
class PulseAudio:
    """A running private daemon: `env` for processes that use it, `pid` to stop it."""

    root: Path
    env: dict[str, str]
    pid: int

    @classmethod
    def start(cls, root: Path) -> PulseAudio:
        binary = shutil.which("pulseaudio")
        if binary is None:
            raise PulseError(
                "pulseaudio is not installed (apt-get install pulseaudio "
                "libasound2-plugins; scripts/install.sh does it)"
            )
        home, runtime = root / "home", root / "run"
        for d in (home, runtime, runtime / "pulse", root / "state"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        (home / ".asoundrc").write_text(ASOUNDRC)
        env = {k: v for k, v in os.environ.items() if k not in _DROP}
        env |= {
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(runtime),
            "PULSE_RUNTIME_PATH": str(runtime / "pulse"),
            "PULSE_STATE_PATH": str(root / "state"),
        }
        log = root / "pulse.log"
        argv = [
            binary,
            "-n",
            "--daemonize=yes",
            "--system=false",
            "--exit-idle-time=-1",
            "--disable-shm=yes",
            "--use-pid-file=yes",
            "--realtime=no",
            "--high-priority=no",
            f"--log-target=file:{log}",
            "--log-level=notice",
        ]
        for module in MODULES:
            argv += ["-L", module]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        pid_file = runtime / "pulse" / "pid"
        if done.returncode != 0 or not pid_file.is_file():
            detail = log.read_text() if log.is_file() else ""
            raise PulseError(
                f"pulseaudio failed (exit {done.returncode}): {done.stderr.strip()}\n{detail}"
            )
        daemon = cls(root, env, int(pid_file.read_text().split()[0]))
        daemon.wait_ready()
        return daemon

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until `pactl info` answers."""
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run(["pactl", "info"], env=self.env, capture_output=True)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PulseError(f"pulseaudio does not answer: {probe.stderr!r}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM our daemon (by its pid), SIGKILL if it lingers."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if Path(f"/proc/{self.pid}").exists():
                os.kill(self.pid, signal.SIGKILL)
