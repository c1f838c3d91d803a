"""Choosing sound devices by index or name (client.devices) on a fake device list: no sound
hardware or PortAudio needed."""

from __future__ import annotations

import types
from typing import Any

import pytest

from client.devices import matching_devices, resolve_device
from client.errors import EXIT_USAGE, ClientError

HOST_APIS = [{"name": "ALSA"}, {"name": "JACK Audio Connection Kit"}]
DEVICES = [
    {"name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "hostapi": 0, "inputs": 2, "outputs": 2},
    {"name": "USB Audio Device: - (hw:1,0)", "hostapi": 0, "inputs": 1, "outputs": 2},
    {"name": "pulse", "hostapi": 0, "inputs": 32, "outputs": 32},
    {"name": "USB Audio Device", "hostapi": 1, "inputs": 1, "outputs": 0},
    {"name": "USB Headset", "hostapi": 1, "inputs": 1, "outputs": 2},
    {"name": "default", "hostapi": 0, "inputs": 32, "outputs": 32},
]


class PortAudioError(Exception):
    pass


def fake_sounddevice() -> types.ModuleType:
    """The parts of sounddevice that device selection uses, over DEVICES.  Asked for a
    device by name it raises what sounddevice 0.5 raises for a name several devices match
    (the client must not depend on that)."""
    sd = types.ModuleType("fake_sounddevice")
    infos = [
        {
            "name": d["name"],
            "index": i,
            "hostapi": d["hostapi"],
            "max_input_channels": d["inputs"],
            "max_output_channels": d["outputs"],
        }
        for i, d in enumerate(DEVICES)
    ]

    def query_hostapis(index: int | None = None) -> Any:
        return HOST_APIS if index is None else HOST_APIS[index]

    def query_devices(device: int | str | None = None, kind: str | None = None) -> Any:
        if device is None and kind is None:
            return infos
        if device is None:
            return infos[5]
        if isinstance(device, str):
            raise ValueError(f"Multiple {kind} devices found for {device!r}:\n[1] ...\n[3] ...")
        return infos[device]

    sd.PortAudioError = PortAudioError  # type: ignore[attr-defined]
    sd.query_hostapis = query_hostapis  # type: ignore[attr-defined]
    sd.query_devices = query_devices  # type: ignore[attr-defined]
    return sd


@pytest.mark.parametrize(
    ("spec", "kind", "index"),
    [
        ("3", "input", 3),  # an index
        (None, "output", 5),  # the default
        ("intel", "input", 0),  # one device matches
        ("usb audio device", "output", 1),  # "USB Audio Device" has no output channels
        ("usb audio alsa", "input", 1),  # words in order, host API included
        ("usb audio device", "input", 3),  # two match; exactly one has this very name
        ("USB HEADSET", "output", 4),  # case ignored
    ],
)
def test_a_device_is_found_by_index_or_by_name(spec: str | None, kind: str, index: int) -> None:
    assert resolve_device(fake_sounddevice(), spec, kind) == (index, DEVICES[index]["name"])


def test_a_name_several_devices_match_is_one_line_listing_them_and_how_to_pick() -> None:
    with pytest.raises(ClientError) as caught:
        resolve_device(fake_sounddevice(), "usb", "input")
    error = caught.value
    assert error.exit_code == EXIT_USAGE
    message = str(error)
    assert "\n" not in message
    assert message == (
        "input device 'usb' is ambiguous: it matches 3 input devices: "
        "[1] 'USB Audio Device: - (hw:1,0)' (ALSA), "
        "[3] 'USB Audio Device' (JACK Audio Connection Kit), "
        "[4] 'USB Headset' (JACK Audio Connection Kit); "
        "pick one by its index (e.g. --input-device 1) or by more of its name"
    )
    assert "found none" not in message


def test_the_output_device_option_is_named_for_an_ambiguous_speaker() -> None:
    with pytest.raises(ClientError, match=r"--output-device 0\)") as caught:
        resolve_device(fake_sounddevice(), "(hw:", "output")
    assert "[0] 'HDA Intel PCH: ALC3246 Analog (hw:0,0)' (ALSA)" in str(caught.value)


def test_a_name_no_device_matches_is_one_line_saying_so() -> None:
    with pytest.raises(ClientError) as caught:
        resolve_device(fake_sounddevice(), "headset alsa", "output")
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_USAGE and "\n" not in message
    assert message.startswith("no sound device: looked for output device 'headset alsa'")
    assert "found none" in message and "--list-devices" in message


def test_matching_devices_lists_index_name_and_host_api() -> None:
    assert matching_devices(fake_sounddevice(), "jack", "input") == [
        (3, "USB Audio Device", "JACK Audio Connection Kit"),
        (4, "USB Headset", "JACK Audio Connection Kit"),
    ]
