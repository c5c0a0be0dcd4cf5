"""`llmux-sim-vllm`: the console script (serve, gpus init, gpus show).

`llmux-sim-vllm serve MODEL ...` is a drop-in for `vllm serve MODEL ...` (see
docs/simulator.md); `gpus init|show DIR` manage the simulated GPU directory.
Exit codes: 0 clean stop, 1 failed start or crash (as vLLM), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from vllmsim.gpustate import DEFAULT_GPU_MIB, DEFAULT_GPU_NAME, GpuState
from vllmsim.options import OptionsError, parse_serve, visible_gpus

log = logging.getLogger("llmux.sim")

USAGE = """usage: llmux-sim-vllm serve MODEL [vLLM flags] [--sim-* flags]
       llmux-sim-vllm gpus init DIR [--count N] [--total-mib M] [--name NAME]
       llmux-sim-vllm gpus show DIR [--json]
       llmux-sim-vllm --version
"""


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"(APIServer pid={os.getpid()}) %(levelname)s %(asctime)s [sim] %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only then (as
    # uvicorn does for vLLM); without it Nagle holds a stream's first chunk ~40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.set_inheritable(False)
    sock.bind((host, port))
    return sock


def _bind_unix(path: str) -> socket.socket:
    """vLLM's ``--uds``: bind the path (an existing file is an error, as in vLLM)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.set_inheritable(False)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    return sock


def serve(argv: Sequence[str]) -> int:
    _setup_logging()
    try:
        opts = parse_serve(argv)
        gpus = visible_gpus(opts, os.environ)
    except OptionsError as e:
        print(f"llmux-sim-vllm serve: error: {e}", file=sys.stderr)
        return 2
    log.info("vLLM API server version 0.32.0 (llmux simulator)")
    log.info("non-default args: model=%s served_model_name=%s sleep_mode=%s gpu_util=%s tp=%d "
             "dtype=%s max_model_len=%d gpus=%s", opts.model, opts.served_model_names,
             opts.enable_sleep_mode, opts.gpu_memory_utilization, opts.tensor_parallel_size,
             opts.dtype, opts.max_model_len, gpus)
    if opts.unknown_args:
        log.info("accepted and ignored vLLM args: %s", " ".join(opts.unknown_args))
    if opts.faults.active:
        log.warning("simulated faults: %s", opts.faults.as_dict())
    if "ignore_sigterm" in opts.faults:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # from the very start
    if opts.enable_sleep_mode and not opts.gpu_state:
        log.info("sleep mode on, no --sim-gpu-state: memory is not tracked")
    if len(gpus) < opts.tensor_parallel_size:
        log.error("ValueError: World size (%d) is larger than the number of available GPUs "
                  "(%d) in this node.", opts.tensor_parallel_size, len(gpus))
        return 1
    try:
        sock = _bind_unix(opts.uds) if opts.uds else _bind(opts.host, opts.port)
    except OSError as e:
        where = opts.uds or f"{opts.host}:{opts.port}"
        log.error("OSError: [Errno %s] %s (%s)", e.errno, e.strerror, where)
        return 1
    from vllmsim.server import SimServer

    async def _main() -> int:
        return await SimServer(opts, gpus, sock).run()

    try:
        code = asyncio.run(_main())
    except KeyboardInterrupt:
        code = 0
    log.info("exiting with code %d", code)
    return code


def gpus_cmd(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="llmux-sim-vllm gpus")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("init", help="create or reset the GPU table (keeps live processes)")
    pi.add_argument("dir")
    pi.add_argument("--count", type=int, default=1)
    pi.add_argument("--total-mib", type=int, default=DEFAULT_GPU_MIB)
    pi.add_argument("--name", default=DEFAULT_GPU_NAME)
    ps = sub.add_parser("show", help="print every GPU and the processes holding memory")
    ps.add_argument("dir")
    ps.add_argument("--json", action="store_true")
    ns = p.parse_args(list(argv))
    state = GpuState(ns.dir)
    if ns.cmd == "init":
        try:
            state.init(ns.count, ns.total_mib, ns.name)
        except (ValueError, OSError) as e:
            print(f"llmux-sim-vllm gpus init: error: {e}", file=sys.stderr)
            return 2
        print(f"{ns.dir}: {ns.count} x {ns.total_mib} MiB ({ns.name})")
        return 0
    if not (state.dir / "gpus.json").exists():
        print(f"llmux-sim-vllm gpus show: {ns.dir} is not initialised "
              "(run: llmux-sim-vllm gpus init DIR)", file=sys.stderr)
        return 1
    snap = state.snapshot()
    entries = state.entries()
    if ns.json:
        print(json.dumps({
            "gpus": [vars(s) for s in snap],
            "procs": list(entries.values()),
        }, indent=2))
        return 0
    print(f"{'GPU':>3}  {'NAME':<24} {'USED MiB':>9} {'TOTAL MiB':>9}")
    for s in snap:
        print(f"{s.index:>3}  {s.name:<24} {s.used_mib:>9} {s.total_mib:>9}")
    if entries:
        print(f"\n{'PID':>8} {'PGID':>8}  USAGE MiB")
        for pid, entry in sorted(entries.items()):
            print(f"{pid:>8} {entry.get('pgid')!s:>8}  {entry.get('usage_mib')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("--version", "-v"):
        print("0.32.0")
        return 0
    if args[0] == "serve":
        return serve(args[1:])
    if args[0] == "gpus":
        return gpus_cmd(args[1:])
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
