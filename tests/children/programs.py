"""Tiny real programs the tests run as children (python -c SOURCE)."""

# Prints a few lines, then waits to be stopped; SIGTERM ends it normally.
CHATTY = r"""
import sys, time
for i in range(5):
    print(f"line {i}", flush=True)
print("to stderr", file=sys.stderr, flush=True)
while True:
    time.sleep(1)
"""

# Ignores SIGTERM: only SIGKILL stops it.
STUBBORN = r"""
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
while True:
    time.sleep(1)
"""

# Forks a grandchild in the same process group that ignores SIGTERM, writes both
# pids to argv[1], then the leader exits (argv[2] == "exit") or waits.
GRANDPARENT = r"""
import os, signal, sys, time
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.close(r)
    os.write(w, b"x")
    os.close(w)
    while True:
        time.sleep(1)
os.close(w)
os.read(r, 1)
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()} {pid}\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2] == "exit":
    sys.exit(0)
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(1)
"""

# Exits at once with status 3 after one line (a failed start).
CRASH = r"""
print("fatal: no such model", flush=True)
raise SystemExit(3)
"""
