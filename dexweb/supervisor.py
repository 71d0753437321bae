"""A small process supervisor for `manage.py dev`: runs named child processes, prints their output line by line
behind a coloured `name | ` prefix, restarts the ones that die, and stops them all, leaving no orphans.

Each child runs in its own session (so a Ctrl-C in the terminal reaches only the supervisor, which decides) and
is signalled as a process group (so a Celery worker's pool processes go with it). On Linux every child also
asks the kernel to kill it when the supervisor dies (PR_SET_PDEATHSIG), so a supervisor that is SIGKILLed leaves
no child behind. Single-threaded: one `selectors` loop reads every child's pipe, reaps and restarts children,
and checks the services it watches (`Watch`: the embedded Postgres and Redis), restarting one that died.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

COLOURS = ["36", "35", "33", "32", "34", "31", "96", "95"]  # cyan, magenta, yellow, green, blue, red, ...


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: Sequence[str]


@dataclass(frozen=True)
class Watch:
    """A service the supervisor did not spawn but keeps alive (an embedded server): checked every
    `every` seconds, restarted with `restart` when `alive` says it died."""

    name: str
    alive: Callable[[], bool]
    restart: Callable[[], object]
    every: float = 1.0


@dataclass
class Child:
    spec: ChildSpec
    colour: str
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # when a dead child is due to start again
    quick_deaths: int = 0  # consecutive deaths soon after starting: the back-off exponent
    partial: bytes = field(default=b"", repr=False)  # the unfinished last line of its output

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: the kernel SIGKILLs it when the supervisor dies, however it dies."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Start `specs`, keep them running until `request_stop()`, then `stop()` them.

    A child that dies is started again after a back-off that doubles from `min_backoff` up to `max_backoff`
    while it keeps dying within `healthy_after` seconds of starting, so a crash loop doesn't spin.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        env: Mapping[str, str],
        watches: Sequence[Watch] = (),
        cwd: Path | str,
        out: IO[str] | None = None,
        colour: bool | None = None,
        grace: float = 10.0,
        min_backoff: float = 1.0,
        max_backoff: float = 30.0,
        healthy_after: float = 10.0,
    ):
        self.children = [Child(spec, COLOURS[i % len(COLOURS)]) for i, spec in enumerate(specs)]
        self.watches = list(watches)
        self._watched_at = time.monotonic()
        self.env = dict(env)
        self.cwd = cwd
        self.out = out or sys.stdout
        self.colour = colour_wanted(self.out) if colour is None else colour
        self.grace = grace
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.healthy_after = healthy_after
        self.width = max(
            (len(name) for name in [*(c.spec.name for c in self.children), *(w.name for w in watches)]), default=0
        )
        self.selector = selectors.DefaultSelector()
        self.stop_requested = 0.0  # when a stop was first asked for; asking again skips the grace period

    # --- output ---------------------------------------------------------------------------------------

    def say(self, child: Child | Watch, line: str, *, own: bool = False) -> None:
        """Print one line behind the child's prefix; `own` lines are the supervisor's, in bold."""
        name = child.spec.name if isinstance(child, Child) else child.name
        prefix = f"{name:<{self.width}} | "
        if self.colour:
            prefix = f"\033[{child.colour if isinstance(child, Child) else '37'}m{prefix}\033[0m"
            if own:
                line = f"\033[1m{line}\033[0m"
        self.out.write(prefix + line + "\n")
        self.out.flush()

    def _read(self, child: Child, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: everything holding the pipe's write end has exited
            self._close(child, fd)
            return
        *lines, child.partial = (child.partial + data).split(b"\n")
        for line in lines:
            self.say(child, line.decode(errors="replace").rstrip("\r"))

    def _close(self, child: Child, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        if child.partial:
            self.say(child, child.partial.decode(errors="replace"))
            child.partial = b""

    def pump(self, timeout: float) -> None:
        """Print whatever the children wrote, waiting up to `timeout` seconds for something."""
        if not self.selector.get_map():
            time.sleep(timeout)
            return
        for key, _ in self.selector.select(timeout):
            self._read(key.data, key.fd)

    # --- processes ------------------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        popen = subprocess.Popen(
            list(child.spec.argv),
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        assert popen.stdout is not None
        # The supervisor reads the raw descriptor, never the file object, so nothing is buffered twice.
        fd = os.dup(popen.stdout.fileno())
        popen.stdout.close()
        os.set_blocking(fd, False)
        self.selector.register(fd, selectors.EVENT_READ, child)
        child.popen = popen
        child.started_at = time.monotonic()
        child.restart_at = None
        self.say(child, f"started (pid {popen.pid})", own=True)

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _reap(self, child: Child) -> None:
        """A child exited: drain its pipe, kill what is left of its group, schedule the restart."""
        assert child.popen is not None
        code = child.popen.returncode
        self._kill_group(child, signal.SIGKILL)
        self._drain(child)
        uptime = time.monotonic() - child.started_at
        child.quick_deaths = child.quick_deaths + 1 if uptime < self.healthy_after else 1
        delay = min(self.max_backoff, self.min_backoff * 2 ** (child.quick_deaths - 1))
        child.restart_at = time.monotonic() + delay
        child.popen = None
        self.say(child, f"{describe_exit(code)} after {uptime:.1f}s; restarting in {delay:g}s", own=True)

    def _drain(self, child: Child) -> None:
        for key in list(self.selector.get_map().values()):
            if key.data is child:
                self._read(child, key.fd)  # what is buffered now; a straggler holding the pipe is not waited for
                self._close(child, key.fd)

    def _kill_group(self, child: Child, sig: int) -> None:
        if child.popen is None:
            return
        # The group id is the child's pid (start_new_session); it outlives the child while members remain.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.popen.pid, sig)

    def check(self) -> None:
        """Reap children that exited and restart those whose back-off has passed; restart a watched service
        that died."""
        now = time.monotonic()
        if self.watches and now - self._watched_at >= min(w.every for w in self.watches):
            self._watched_at = now
            for watch in self.watches:
                self._keep_alive(watch)
        for child in self.children:
            if child.popen is not None and child.popen.poll() is not None:
                self._reap(child)
            elif child.popen is None and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)

    def _keep_alive(self, watch: Watch) -> None:
        try:
            if watch.alive():
                return
        except Exception:  # a check that can't tell is no reason to restart a server
            return
        self.say(watch, "died; restarting it", own=True)
        try:
            watch.restart()
        except Exception as exc:
            self.say(watch, f"could not restart: {exc}; trying again", own=True)
        else:
            self.say(watch, "restarted", own=True)

    def request_stop(self, signum: int | None = None, frame: object = None) -> None:
        now = time.monotonic()
        if not self.stop_requested:
            self.stop_requested = now
        # Asked again: don't wait for a graceful exit. A second signal right after the first is the same
        # Ctrl-C delivered twice (`uv run` forwards the SIGINT its child also got from the terminal).
        elif now - self.stop_requested > 1.0:
            for child in self.children:
                self._kill_group(child, signal.SIGKILL)

    def run(self) -> None:
        """Supervise until `request_stop()` (a signal handler calls it)."""
        while not self.stop_requested:
            self.pump(0.1)
            self.check()

    def stop(self) -> None:
        """SIGTERM every child's group, SIGKILL what is still there after the grace period, reap them all."""
        for child in self.children:
            if child.running:
                self.say(child, "stopping", own=True)
            self._kill_group(child, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while any(c.running for c in self.children) and time.monotonic() < deadline:
            self.pump(0.05)
        for child in self.children:
            if child.running:
                self.say(child, f"still running after {self.grace:g}s; killing it", own=True)
            # Also catches a group member that outlived its leader's clean exit.
            self._kill_group(child, signal.SIGKILL)
            if child.popen is not None:
                code = child.popen.wait()
                self._drain(child)
                self.say(child, describe_exit(code), own=True)
                child.popen = None
        self.selector.close()


def colour_wanted(out: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(out, "isatty") and out.isatty()
