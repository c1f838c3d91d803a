"""Offline coding of audio files to and from bitstream files, through the streaming engine.

The same `EncoderStream` / `DecoderStream` code the server runs does the work; this module
adds what a file needs around it so that `decode(encode(x))` is **aligned** with `x` and has
**exactly** its length:

* encoding: the input (any rate) is resampled to the model rate by `client.audiofile.resample`
  (delay-compensated), then zero-padded to F whole frames with
  F = ceil((n + D) / N), n the model-rate length, N the frame size, D the card's
  `output_delay_samples`: the extra D samples let the decoder emit the last D input samples
  (the decoded stream lags the input by D);
* decoding: F frames give F * N samples; dropping the first D aligns them with the input,
  and the first n are kept (n from the file's source record, else F * N - D), then they are
  resampled to the output rate (delay-compensated) with the original length when the rate
  is the original one.

`prepare_input` + `frames_to_audio` are shared with the remote path (client.remote), which
sends the same padded model-rate PCM to the server, so both give the same tokens.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from client.audiofile import Audio, resample, resampled_length
from client.errors import EXIT_USAGE, ClientError
from client.progress import progress_bar
from streaming.framing import SampleFormat
from streaming.lowband import LOWBAND_LAYOUT_NONE
from streaming.model import BitrateMode, CodecModel, ModelCard, ModelError
from streaming.protocol import (
    BitstreamHeader,
    ProtocolError,
    SourceInfo,
    TokenFrame,
    decode_file_header,
    read_bitstream,
    write_bitstream,
)
from streaming.stream import DecoderStream, EncoderStream

__all__ = [
    "DEFAULT_KBPS",
    "CodecParams",
    "PreparedInput",
    "add_mode_arguments",
    "check_header",
    "decode_frames_local",
    "decode_local",
    "describe_mode",
    "encode_local",
    "encode_pcm_local",
    "frames_to_audio",
    "load_model",
    "mode_for",
    "mode_from_args",
    "model_length",
    "payload_kbps",
    "prepare_input",
    "read_bitstream_file",
]

F32: TypeAlias = npt.NDArray[np.float32]
Progress: TypeAlias = Callable[[int], object]
"""Called with the number of frames just processed."""

CHUNK_FRAMES = 25
"""Frames per engine call (0.5 s): below the streams' 1 s buffers, fine-grained progress."""

DEFAULT_KBPS = 6.0
"""Bitrate budget when neither --kbps nor --codebooks is given."""


@cache
def load_model(path: Path | None = None) -> CodecModel:
    """The codec model of `path` (default: the bundled one), loaded once per process.

    Raises ClientError when the directory is not a valid model.
    """
    try:
        return CodecModel.load(path)
    except ModelError as exc:
        raise ClientError(f"cannot load the codec model: {exc}") from None


def add_mode_arguments(parser: argparse.ArgumentParser, kbps_help: str) -> None:
    """--kbps | --codebooks N, and --lowband-layout L (with --codebooks): the bitrate mode."""
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--kbps", type=float, help=kbps_help)
    rate.add_argument(
        "--codebooks",
        type=int,
        metavar="N",
        help="exact mode: N codebooks per frame, 1..Q, without low band (see --lowband-layout)",
    )
    parser.add_argument(
        "--lowband-layout",
        type=int,
        metavar="L",
        help="with --codebooks: also send low-band layout L (0 none, 1, 2; expert use: --kbps "
        "picks the layout itself)",
    )


def mode_for(
    card: ModelCard,
    kbps: float | None,
    codebooks: int | None,
    lowband_layout: int | None = None,
) -> BitrateMode:
    """The bitrate mode of --kbps (the card's mode for that budget, `mode_for_bitrate`; default
    6 kbps) or --codebooks N [--lowband-layout L] (N codebooks with layout L, default 0)."""
    q = card.num_codebooks
    if lowband_layout is not None and codebooks is None:
        raise ClientError(
            "--lowband-layout needs --codebooks (--kbps picks the layout itself)",
            exit_code=EXIT_USAGE,
        )
    if codebooks is not None:
        if not 1 <= codebooks <= q:
            raise ClientError(
                f"--codebooks must be in 1..{q} for model {card.model_id}", exit_code=EXIT_USAGE
            )
        layout = LOWBAND_LAYOUT_NONE if lowband_layout is None else lowband_layout
        usable = card.lowband_layouts
        if layout not in usable:
            raise ClientError(
                f"--lowband-layout must be one of {', '.join(map(str, usable))} for model "
                f"{card.model_id}",
                exit_code=EXIT_USAGE,
            )
        return card.mode(codebooks, layout)
    if kbps is not None and not math.isfinite(kbps):
        raise ClientError(f"--kbps must be a finite number, got {kbps}", exit_code=EXIT_USAGE)
    try:
        return card.mode_for_bitrate(DEFAULT_KBPS if kbps is None else kbps)
    except ValueError as exc:
        raise ClientError(f"--kbps: {exc}", exit_code=EXIT_USAGE) from None


def mode_from_args(card: ModelCard, args: argparse.Namespace) -> BitrateMode:
    """`mode_for` of the --kbps / --codebooks / --lowband-layout options in `args`."""
    return mode_for(card, args.kbps, args.codebooks, getattr(args, "lowband_layout", None))


def describe_mode(mode: BitrateMode) -> str:
    """`mode` for people: "3 codebooks + low band 2, 6.00 kbps nominal"."""
    s = "" if mode.num_codebooks == 1 else "s"
    low = f" + low band {mode.lowband_layout}" if mode.lowband_layout else ""
    return f"{mode.num_codebooks} codebook{s}{low}, {mode.kbps:.2f} kbps nominal"


def payload_kbps(data: bytes, seconds: float) -> float:
    """Payload bitrate of a bitstream file measured on its size: the bits after the header
    (frame payloads, not byte-aligned, + < 8 padding bits) per second, kbps."""
    _, header_size = decode_file_header(data)
    return 8 * (len(data) - header_size) / seconds / 1000.0 if seconds > 0 else 0.0


@dataclass(frozen=True)
class CodecParams:
    """What file coding needs to know of a model (the local card or a server's `ready`).

    Rates in Hz, sizes in samples at `sample_rate` (the model rate), bit widths in bits.
    """

    model_id: str
    sample_rate: int
    frame_size: int
    output_delay_samples: int
    code_bits: int
    gain_bits: int
    num_codebooks: int

    @classmethod
    def from_card(cls, card: ModelCard) -> CodecParams:
        """The parameters of a model card."""
        return cls(
            card.model_id,
            card.sample_rate,
            card.frame_size,
            card.output_delay_samples,
            card.code_bits,
            card.gain.bits,
            card.num_codebooks,
        )

    def header(self, source: SourceInfo | None = None) -> BitstreamHeader:
        """File header fields, with the source record when given (the writer fills in the
        frame count)."""
        return BitstreamHeader(
            self.model_id,
            self.sample_rate,
            self.frame_size,
            self.code_bits,
            self.gain_bits,
            self.num_codebooks,
            source=source,
        )


@dataclass(frozen=True)
class PreparedInput:
    """Model-rate PCM ready to encode: `pcm` holds `frames` whole frames (zero-padded), of
    which the first `length` samples are the input; `source` describes the original."""

    pcm: F32
    length: int
    frames: int
    source: SourceInfo


def prepare_input(audio: Audio, card: CodecParams) -> PreparedInput:
    """Resample `audio` to the model rate and zero-pad it to F = ceil((n + D) / N) frames."""
    n_frame, delay = card.frame_size, card.output_delay_samples
    x = resample(audio.samples, audio.rate, card.sample_rate)
    frames = -(-(x.shape[0] + delay) // n_frame)
    pcm = np.zeros(frames * n_frame, dtype=np.float32)
    pcm[: x.shape[0]] = x
    return PreparedInput(pcm, x.shape[0], frames, SourceInfo(audio.rate, audio.samples.shape[0]))


def encode_pcm_local(
    model: CodecModel,
    pcm: F32,
    mode: BitrateMode | int,
    progress: Progress | None = None,
    *,
    rate_cap: bool = False,
) -> list[TokenFrame]:
    """Tokens of model-rate float32 `pcm` (whole frames) through an `EncoderStream` in bitrate
    `mode` (an int: that many codebooks without low band); `rate_cap`: the stream's hard cap
    on the mode's rate (`EncoderStream(rate_cap=True)`)."""
    card = model.card
    enc = EncoderStream(model, rate=card.sample_rate, fmt=SampleFormat.F32LE, rate_cap=rate_cap)
    if isinstance(mode, BitrateMode):
        enc.set_mode(mode)
    else:
        enc.set_num_codebooks(mode)
    step = CHUNK_FRAMES * card.frame_size
    frames: list[TokenFrame] = []
    for i in range(0, pcm.shape[0], step):
        got = enc.encode(pcm[i : i + step])
        frames += got
        if progress is not None:
            progress(len(got))
    enc.flush()
    return frames + enc.pull()


def decode_frames_local(
    model: CodecModel, frames: Sequence[TokenFrame], progress: Progress | None = None
) -> F32:
    """Model-rate float32 PCM of `frames` (len(frames) * N samples) through a DecoderStream."""
    card = model.card
    dec = DecoderStream(model, rate=card.sample_rate, fmt=SampleFormat.F32LE)
    out = np.zeros(len(frames) * card.frame_size, dtype=np.float32)
    pos = 0
    for i in range(0, len(frames), CHUNK_FRAMES):
        part = frames[i : i + CHUNK_FRAMES]
        dec.push_many(part)
        dec.run()
        pos += dec.pull_into(out[pos:])
        if progress is not None:
            progress(len(part))
    dec.flush()
    pos += dec.pull_into(out[pos:])
    if pos != out.shape[0]:
        raise ClientError(f"decoder produced {pos} samples for {len(frames)} frames")
    return out


def model_length(card: CodecParams, frames: int, source: SourceInfo | None) -> int:
    """Model-rate samples the input had: from the source record, else F * N - D."""
    if source is not None:
        return resampled_length(source.samples, source.rate, card.sample_rate)
    return max(frames * card.frame_size - card.output_delay_samples, 0)


def frames_to_audio(
    decoded: F32, card: CodecParams, frames: int, source: SourceInfo | None, rate: int | None
) -> Audio:
    """Aligned output of the decoded model-rate PCM `decoded` (F * N samples): drop the D
    samples of decoder delay, keep the input's length, resample to `rate` (default: the
    source rate, else the model rate)."""
    n = model_length(card, frames, source)
    d = card.output_delay_samples
    aligned = np.zeros(n, dtype=np.float32)
    got = decoded[d : d + n]
    aligned[: got.shape[0]] = got
    out_rate = rate if rate is not None else (source.rate if source else card.sample_rate)
    if out_rate <= 0:
        raise ClientError(f"--rate must be a positive number of Hz, got {out_rate}")
    if source is not None and out_rate == source.rate:
        length = source.samples
    else:
        length = resampled_length(n, card.sample_rate, out_rate)
    return Audio(resample(aligned, card.sample_rate, out_rate, length), out_rate)


def read_bitstream_file(path: Path) -> tuple[BitstreamHeader, list[TokenFrame]]:
    """Read a bitstream file (its source record, if any, is `header.source`): a clear
    ClientError for a missing or malformed file."""
    if not path.is_file():
        raise ClientError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return read_bitstream(data)
    except ProtocolError as exc:
        raise ClientError(f"{path}: not a valid codecstream bitstream file ({exc})") from None


def check_header(header: BitstreamHeader, card: CodecParams, where: str) -> None:
    """ClientError if the file's parameters differ from the model's; warn on another id."""
    mine = (card.sample_rate, card.frame_size, card.code_bits, card.gain_bits, card.num_codebooks)
    theirs = (
        header.sample_rate,
        header.frame_size,
        header.code_bits,
        header.gain_bits,
        header.num_codebooks,
    )
    if mine != theirs:
        raise ClientError(
            f"{where}: made for model {header.model_id!r} with (rate, frame, code bits, gain "
            f"bits, codebooks) = {theirs}; model {card.model_id!r} has {mine}"
        )
    if header.model_id != card.model_id:
        print(
            f"codec-client: warning: {where} was encoded by model {header.model_id!r}, "
            f"decoding with {card.model_id!r}",
            file=sys.stderr,
        )


def encode_local(
    audio: Audio,
    model: CodecModel,
    mode: BitrateMode | int,
    *,
    quiet: bool = False,
    rate_cap: bool = False,
) -> tuple[bytes, int]:
    """The bitstream file bytes of `audio` encoded locally in bitrate `mode` (see
    `encode_pcm_local`); returns (data, frames)."""
    params = CodecParams.from_card(model.card)
    prepared = prepare_input(audio, params)
    with progress_bar(prepared.frames, "encoding", quiet=quiet) as bar:
        frames = encode_pcm_local(model, prepared.pcm, mode, bar.update, rate_cap=rate_cap)
    return write_bitstream(params.header(prepared.source), frames), len(frames)


def decode_local(
    frames: Sequence[TokenFrame],
    source: SourceInfo | None,
    model: CodecModel,
    rate: int | None,
    *,
    quiet: bool = False,
) -> Audio:
    """Aligned audio of `frames` decoded locally (see `frames_to_audio`)."""
    with progress_bar(len(frames), "decoding", quiet=quiet) as bar:
        decoded = decode_frames_local(model, frames, bar.update)
    return frames_to_audio(decoded, CodecParams.from_card(model.card), len(frames), source, rate)
