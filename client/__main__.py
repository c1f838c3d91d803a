"""`codec-client`: voice calls, file encode/decode, token streaming, latency profiling.

Exit codes: 0 success, 1 failure (bad input file, server error, ...), 2 bad command line or
a missing resource such as a sound device, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from client.errors import EXIT_FAILURE, ClientError

COMMANDS: dict[str, str] = {
    "call": "join a voice-call room: microphone in, speaker out",
    "encode": "encode an audio file to a codec token file",
    "decode": "decode a codec token file to audio",
    "stream": "stream audio to the server and print the tokens it returns",
    "profile": "measure end-to-end latency against a running server",
}

EXIT_INTERRUPTED = 130

Runner = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from client import cmd_call, cmd_files, cmd_profile, cmd_stream

    parser = argparse.ArgumentParser(
        prog="codec-client",
        description="codecstream client (docs/client.md)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmd_call.add_call(sub, COMMANDS["call"])
    cmd_files.add_encode(sub, COMMANDS["encode"])
    cmd_files.add_decode(sub, COMMANDS["decode"])
    cmd_stream.add_stream(sub, COMMANDS["stream"])
    cmd_profile.add_profile(sub, COMMANDS["profile"])
    return parser


def _runner(command: str) -> Runner:
    from client import cmd_call, cmd_files, cmd_profile, cmd_stream

    runners: dict[str, Runner] = {
        "call": cmd_call.run_call,
        "encode": cmd_files.run_encode,
        "decode": cmd_files.run_decode,
        "stream": cmd_stream.run_stream,
        "profile": cmd_profile.run_profile,
    }
    return runners[command]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _runner(args.command)(args)
    except ClientError as exc:
        print(f"codec-client {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"codec-client {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
