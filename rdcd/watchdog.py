"""Take the local Ray instance a command started down with it, however the command ends.

`rdcd embed` (and index, train, serve, demo) start a local Ray when `RAY_ADDRESS` is unset. Ray
fate-shares its GCS and raylet with the driver (PR_SET_PDEATHSIG), but the raylet's own children
outlive a SIGKILLed driver: the dashboard agent and the runtime-env agent notice the raylet is
gone, then spend about a minute trying to report that to the dead GCS before they exit, holding
memory and ports; a worker stuck in a system call can linger as well. A thread in the driver
cannot clean up after a SIGKILL, so a small process does: it records the driver's descendants
while the driver lives, and when the driver is gone (its pipe reaches end of file) it ends the
recorded processes that are still there, SIGTERM first, then SIGKILL.

Only processes that were seen as descendants of the driver are touched, each checked by pid and
start time (a recycled pid is never signalled), so another user's Ray on the same machine, or a
cluster the command merely connected to, is left alone. Linux only (it reads /proc); elsewhere it
is a no-op.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

SCAN_INTERVAL_S = 0.5  # how often the driver's process tree is recorded
TERM_GRACE_S = 3.0  # from SIGTERM to SIGKILL
DISABLE_ENV = "RDCD_NO_RAY_WATCHDOG"  # set to 1 to start no watchdog

_started: subprocess.Popen | None = None
_pipe_w: int | None = None


def _stat(pid: int) -> tuple[int, int] | None:
    """`(ppid, start time in clock ticks)` of `pid`, or None when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of `root`, as pid -> start time (one pass over /proc)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None:
            children.setdefault(st[0], []).append((int(name), st[1]))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), []):
            if pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


def end_processes(procs: dict[int, int], grace_s: float = TERM_GRACE_S) -> list[int]:
    """SIGTERM the recorded processes that are still the same processes, SIGKILL whatever is left
    after `grace_s`. Returns the pids that were signalled."""
    signalled = []
    for pid, start in procs.items():
        if _alive(pid, start):
            try:
                os.kill(pid, signal.SIGTERM)
                signalled.append(pid)
            except OSError:
                pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p, procs[p]) for p in signalled):
        time.sleep(0.1)
    for pid in signalled:
        if _alive(pid, procs[pid]):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return signalled


def watch(driver: int, fd: int, interval_s: float = SCAN_INTERVAL_S) -> int:
    """The watchdog's loop: record `driver`'s descendants until `fd` reaches end of file (the
    driver exited, or was killed), then end those still running. Returns how many it ended."""
    me = os.getpid()
    driver_stat = _stat(driver)
    known: dict[int, int] = {}
    while driver_stat is not None:
        ready, _, _ = select.select([fd], [], [], interval_s)
        if ready and not os.read(fd, 4096):
            break
        if not _alive(driver, driver_stat[1]):  # gone, though a forked child still holds the pipe
            break
        # Forget the dead (Ray workers come and go), add the newcomers.
        known = {p: s for p, s in known.items() if _alive(p, s)}
        known.update(descendants(driver))
        known.pop(me, None)
    left = {p: s for p, s in known.items() if _alive(p, s)}
    ended = end_processes(left)
    if ended:
        print(f"rdcd: the command (pid {driver}) ended; stopped {len(ended)} process(es) of the "
              f"local Ray it had started: {sorted(ended)}", file=sys.stderr)  # fmt: skip
    return len(ended)


def start() -> int | None:
    """Start the watchdog for this process, once; returns its pid, or None where there is none.

    Call it before starting a local Ray: only processes recorded while this one lives are ended,
    and Ray's agents start within a second of `ray.init`. A command that connects to a cluster
    (`RAY_ADDRESS`) or runs inside a process that already has Ray needs none."""
    global _started, _pipe_w
    if _started is not None:
        return _started.pid
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_ENV) == "1":
        return None
    read_fd, write_fd = os.pipe()  # both close-on-exec: Ray's processes do not inherit them
    try:
        _started = subprocess.Popen(
            [sys.executable, "-m", "rdcd.watchdog", str(os.getpid()), str(read_fd)],
            pass_fds=(read_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # not in the terminal's group: Ctrl-C must not stop it first
            close_fds=True,
        )
    except OSError as exc:
        os.close(write_fd)
        log.warning("no Ray watchdog (%s): a killed command may leave Ray processes behind", exc)
        return None
    finally:
        os.close(read_fd)
    _pipe_w = write_fd  # held open until this process ends, however it ends
    log.debug("Ray watchdog pid %d watches pid %d", _started.pid, os.getpid())
    return _started.pid


def _main(argv: list[str]) -> int:
    driver, fd = int(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's Ctrl-C is the driver's business
    watch(driver, fd)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
