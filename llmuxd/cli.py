"""The ``llmuxd`` command: run the daemon, check a config, or validate a model alone.

Every user error (bad config, socket in use, no probe) ends as readable lines on
stderr and a non-zero exit code, never a traceback: 2 for a config/usage error,
1 for a failure while running.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmuxd import __version__ as VERSION
from llmuxd import tomlout
from llmuxd.config import Config, ConfigError, load_config, policy_warnings
from llmuxd.redact import redact_config

DEFAULT_CONFIG = "/etc/llmux.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="llmuxd",
        description="Serve many vLLM models behind one OpenAI-compatible port.")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                   help=f"config file, TOML or the seed's JSON (default {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true",
                   help="print the resolved config (or every error) and exit")
    p.add_argument("--json", action="store_true", help="with --check-config: print JSON")
    p.add_argument("--validate", metavar="MODEL",
                   help="start MODEL alone, cycle it through sleep levels, compare answers")
    p.add_argument("--levels", default="1,2", help="with --validate: levels, e.g. 1,2,3")
    p.add_argument("--verbose", action="store_true", help="with --validate: narrate")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-frontend", action="store_true",
                   help="do not start the gunicorn front end (control API only)")
    p.add_argument("--version", action="version", version=f"llmuxd {VERSION}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    if args.check_config:
        data = redact_config(config.to_dict())
        print(json.dumps(data, indent=2) if args.json else render_toml(config))
        for warning in policy_warnings(config):
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    if args.validate:
        return _validate(config, args)
    return _run(config, args)


def _run(config: Config, args: argparse.Namespace) -> int:
    from llmuxd.control.server import ControlSocketError
    from llmuxd.logsetup import setup_logging
    from llmuxd.supervisor import Supervisor

    setup_logging(args.log_level)
    sup = Supervisor(config, args.config, frontend=not args.no_frontend)
    sup.install_signals()
    try:
        return sup.run()
    except ControlSocketError as exc:
        print(f"llmuxd: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if type(exc).__name__ in ("ProbeUnavailable", "GuardianError"):
            print(f"llmuxd: {exc}", file=sys.stderr)
            return 1
        raise


def _validate(config: Config, args: argparse.Namespace) -> int:
    from llmuxd.gpu.select import make_probe
    from llmuxd.validate import ValidateError, format_table, run_validate

    try:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        print(f"--levels: expected numbers like 1,2 (got {args.levels!r})", file=sys.stderr)
        return 2
    try:
        probe = make_probe(config)
        say = (lambda text: print(text, flush=True)) if args.verbose else None
        report = run_validate(config, args.validate, levels, probe, say)
    except ValidateError as exc:
        print(f"llmuxd: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ == "ProbeUnavailable":
            print(f"llmuxd: {exc}", file=sys.stderr)
            return 1
        raise
    print(format_table(report))
    return 0 if report.passed else 1


def render_toml(config: Config) -> str:
    """The resolved config in TOML form (every default filled in, secrets redacted)."""
    data = redact_config(config.to_dict())
    data.pop("source", None)
    return f"# resolved from {config.source}\n" + tomlout.dumps(data)
