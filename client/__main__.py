"""`codec-client` entry point (skeleton: the subcommands land with the client work)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "call": "join a voice-call room: microphone in, speaker out",
    "encode": "encode an audio file to a codec token file",
    "decode": "decode a codec token file to audio",
    "stream": "stream audio to the server and print the tokens it returns",
    "profile": "measure end-to-end latency against a running server",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codec-client", description="codecstream client")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"codec-client {args.command}: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
