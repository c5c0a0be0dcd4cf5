"""``llmuxctl``: control a running llmuxd (status, start, sleep, wake, switch, logs, ...).

The parser is the documentation: packaging builds llmuxctl(1) from ``--help``, so the
option help and the epilog (socket resolution, exit codes) are written for that page.
``main`` is the one place where failures become one stderr line and an exit code;
nothing below it prints a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import TextIO

from llmuxctl import __version__, fleet
from llmuxctl.client import ControlClient
from llmuxctl.commands import COMMANDS, DEFAULT_OP_TIMEOUT, Context
from llmuxctl.errors import (
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CtlError,
)
from llmuxctl.locate import resolve

PROG = "llmuxctl"

DESCRIPTION = """\
Control llmuxd, the daemon that serves many vLLM models behind one OpenAI-compatible
port by switching them with vLLM's sleep/wake API. llmuxctl talks to llmuxd over its
control socket; reading state needs access to the socket, changing it needs root, the
daemon's user or membership in the socket's group (llmux)."""

EPILOG = f"""\
socket:
  -s SOCKET, else $LLMUX_SOCKET, else daemon.socket of the config given with -c
  (default {DEFAULT_CONFIG}, when readable), else {DEFAULT_SOCKET}.

long operations:
  start, sleep, wake, kill, switch and validate wait for the result, with a progress
  line on a terminal; --no-wait returns as soon as llmuxd has accepted the operation,
  --timeout SECS gives up waiting (llmuxd carries on). Ctrl-C stops waiting only.

exit status:
  0  success
  1  the operation failed or llmuxd refused it (unknown model, failed start, validate
     found a failure, ...)
  2  usage error (bad command line, unusable config file)
  3  llmuxd unreachable (not running, stale socket, not answering)
  4  permission denied (socket file or llmuxd's peer check)
  130 interrupted (Ctrl-C while waiting)

examples:
  llmuxctl status
  llmuxctl switch qwen-14b
  llmuxctl sleep gemma-12b --level 2
  llmuxctl logs qwen-14b -f
  llmuxctl validate qwen-14b --levels 1,2 --verbose
  llmuxctl status --json | jq '.models[] | {{name, state}}'"""

VISIBLE = ("status", "start", "sleep", "wake", "kill", "switch", "logs", "reload",
           "validate", "version", "fleet")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _line_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of lines: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _levels(text: str) -> list[int]:
    """``1,2`` → [1, 2]; each level once, each one of 1, 2, 3."""
    levels: list[int] = []
    for part in text.split(","):
        part = part.strip().upper().removeprefix("L")
        if part not in ("1", "2", "3"):
            raise argparse.ArgumentTypeError(
                f"levels are a comma-separated list of 1, 2, 3 (got {text!r})")
        if int(part) in levels:
            raise argparse.ArgumentTypeError(f"level {part} given twice in {text!r}")
        levels.append(int(part))
    return levels


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; shared by main, the tests and the man page."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=fmt)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", metavar="CONFIG",
                       help=f"llmux config to take daemon.socket from (default {DEFAULT_CONFIG})")
    where.add_argument("-s", "--socket", metavar="SOCKET",
                       help="llmuxd's control socket (overrides $LLMUX_SOCKET and -c)")
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's data as JSON (for scripts); also "
                             "accepted after the command")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}",
                        help="print llmuxctl's version and exit (see also: llmuxctl version)")

    # Options every subcommand accepts after its name, without overriding the global ones.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the daemon's data as JSON")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--no-wait", action="store_true",
                         help="return once llmuxd has accepted the operation")
    waiting.add_argument("--timeout", type=_positive_float, default=DEFAULT_OP_TIMEOUT,
                         metavar="SECS",
                         help=f"give up waiting after SECS (default {DEFAULT_OP_TIMEOUT:g}; "
                              "llmuxd bounds every operation with its own timeouts)")

    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                title="commands")
    model_help = "model name (or alias) from the config"

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser,
            description: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=description or help_text,
                              parents=[common, *parents])

    p = add("status", "show every model (or the ones named) as a table",
            description="Show each model's state, sleep level, pid, port, in-flight and "
                        "queued requests, GPU memory, time in state and last switch.")
    p.add_argument("models", nargs="*", metavar="MODEL", help=model_help)

    p = add("start", "start a model and wait until it serves", waiting)
    p.add_argument("model", metavar="MODEL", help=model_help)

    p = add("sleep", "put a model to sleep", waiting,
            description="Put a model to sleep: L1 offloads weights to host RAM (fast wake), "
                        "L2 discards them (reload on wake), L3 stops the process.")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--level", type=int, choices=(1, 2, 3),
                   help="sleep level (default: the model's configured sleep_level)")

    p = add("wake", "wake a sleeping model (or start a stopped one)", waiting)
    p.add_argument("model", metavar="MODEL", help=model_help)

    p = add("kill", "stop a model's process now (in-flight requests fail)", waiting)
    p.add_argument("model", metavar="MODEL", help=model_help)

    p = add("switch", "make a model active now (others sleep as needed)", waiting)
    p.add_argument("model", metavar="MODEL", help=model_help)

    p = add("logs", "print the end of a model's vLLM log",
            description="Print the last lines of a model's vLLM log (<log_dir>/<model>.log); "
                        "with -f keep printing new lines until Ctrl-C.")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", type=_line_count, default=50, metavar="N",
                   help="how many lines to print first (default 50)")

    p = add("reload", "make llmuxd re-read its config (like systemctl reload llmux)")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_OP_TIMEOUT,
                   metavar="SECS", help="give up waiting after SECS")

    p = add("validate", "check sleep/wake cycles of a model through llmuxd",
            description="For each level: a deterministic request, sleep (timed), GPU memory "
                        "before and after, wake (timed), GPU memory after wake, the same "
                        "request again. A level passes when the answers match and the GPU "
                        "memory was really freed. Exit 0 when all levels pass, else 1.")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--levels", type=_levels, default=[1, 2], metavar="LEVELS",
                   help="comma-separated sleep levels to check (default 1,2)")
    p.add_argument("--verbose", "-v", action="store_true", help="print each step")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_OP_TIMEOUT,
                   metavar="SECS", help="give up waiting after SECS")

    add("version", "print the versions of llmuxctl and of the running llmuxd")
    help_text = "config for a router in front of several llmux boxes"
    fleet.build_parser(sub.add_parser("fleet", help=help_text, description=help_text))
    # For shell completion only: model names, one a line (not listed in --help).
    sub.add_parser("_models", parents=[common])
    sub._choices_actions = [a for a in sub._choices_actions if a.dest in VISIBLE]
    return parser


def _quiet_broken_pipe() -> None:
    """The reader went away (``| head``): point stdout at /dev/null so exit stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _install_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt, whatever disposition we inherited.

    Python keeps an inherited SIG_IGN (a background job of a non-interactive shell
    starts that way), and then Ctrl-C or ``kill -INT`` would do nothing while we wait.
    Only from the main thread (signal.signal refuses elsewhere: tests calling main).
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run one command; return its exit code (docs/interfaces.md section 7)."""
    _install_sigint()
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if not args.command:
        parser.print_usage(err)
        err.write(f"{PROG}: error: a command is required (see: {PROG} --help)\n")
        return EXIT_USAGE
    if args.command == "fleet":  # talks to front ends over TCP, not to a socket
        return fleet.run(args, out, err)
    ctx: Context | None = None
    try:
        target = resolve(args.socket, args.config)
        ctx = Context(args, target, ControlClient(target.socket), out, err)
        return COMMANDS[args.command](ctx)
    except CtlError as exc:
        if ctx is not None and ctx.json:
            try:
                ctx.emit_json(exc.to_dict())
            except BrokenPipeError:
                _quiet_broken_pipe()
        err.write(exc.line() + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_OK
    except Exception as exc:  # a bug here: still one line, never a traceback
        err.write(f"{PROG}: internal error: {type(exc).__name__}: {exc} "
                  "(please report it with the command you ran)\n")
        return EXIT_FAILED
    finally:
        if ctx is not None:
            ctx.client.close()
