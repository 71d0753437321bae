"""The process supervisor behind `manage.py dev`, with tiny Python children: prefixed output, restarts with
back-off, and a stop that leaves no process of any child's group behind."""

from __future__ import annotations

import io
import re
import signal
import sys
import time
from collections.abc import Callable

import psutil

from dexweb.supervisor import ChildSpec, Supervisor
from tests.conftest import ROOT


def child(name: str, code: str) -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-c", code])


def supervise_until(sup: Supervisor, out: io.StringIO, predicate: Callable[[str], object], timeout: float = 15):
    deadline = time.monotonic() + timeout
    while not (found := predicate(out.getvalue())):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; supervisor output:\n{out.getvalue()}")
        sup.pump(0.05)
        sup.check()
    return found


def make(*specs: ChildSpec, **options) -> tuple[Supervisor, io.StringIO]:
    out = io.StringIO()
    return Supervisor(specs, env={"PYTHONUNBUFFERED": "1"}, cwd=ROOT, out=out, colour=False, **options), out


def test_it_prefixes_every_line_with_the_padded_child_name():
    sup, out = make(
        child("web", "print('one'); print('two', end='')"), child("scheduler", "import time; time.sleep(30)")
    )
    sup.start()
    try:
        supervise_until(sup, out, lambda text: "web       | two\n" in text)
        assert "web       | one\n" in out.getvalue()
        assert re.search(r"^scheduler \| started \(pid \d+\)$", out.getvalue(), re.M)
    finally:
        sup.stop()


def test_it_restarts_a_dying_child_with_a_doubling_back_off():
    sup, out = make(child("flaky", "raise SystemExit(3)"), min_backoff=0.1, max_backoff=0.2)
    sup.start()
    try:
        supervise_until(sup, out, lambda text: text.count("exited with code 3") >= 3)
    finally:
        sup.stop()
    delays = re.findall(r"exited with code 3 after [\d.]+s; restarting in ([\d.]+)s", out.getvalue())
    assert delays[:3] == ["0.1", "0.2", "0.2"]
    assert out.getvalue().count("flaky | started (pid") >= 3


def test_it_stops_every_process_of_a_childs_group_even_one_ignoring_sigterm():
    stubborn = (
        "import signal, subprocess, sys, time\n"
        "code = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1); time.sleep(60)'\n"
        "p = subprocess.Popen([sys.executable, '-c', code])\n"
        "print('grandchild', p.pid)\n"
        "time.sleep(60)\n"
    )
    sup, out = make(child("worker", stubborn), grace=0.5)
    sup.start()
    grandchild = psutil.Process(int(supervise_until(sup, out, lambda t: re.search(r"grandchild (\d+)", t)).group(1)))
    supervise_until(sup, out, lambda text: "worker | 1\n" in text)  # it ignores SIGTERM from now on
    sup.stop()
    gone, alive = psutil.wait_procs([grandchild], timeout=5)
    # The child itself exited on SIGTERM; its grandchild, which ignored it, went with the group's SIGKILL.
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], out.getvalue()
    assert "worker | killed by SIGTERM" in out.getvalue()


def test_it_takes_a_ctrl_c_delivered_twice_at_once_as_one():
    graceful = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.3), sys.exit(0)))\n"
        "print('up'); time.sleep(60)\n"
    )
    sup, out = make(child("web", graceful))
    sup.start()
    supervise_until(sup, out, lambda text: "web | up" in text)
    sup.request_stop(signal.SIGINT)
    sup.request_stop(signal.SIGINT)  # `uv run` forwards the SIGINT the terminal also sent its child
    sup.run()  # returns at once: a stop was requested
    sup.stop()
    assert "web | exited with code 0" in out.getvalue()
