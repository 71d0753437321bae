"""A hypothesis state machine over the run lifecycle and the scheduler, driving the real engine functions
(run_execute, scheduler_tick, run_request_cancel, run_retry, event_send) against the test database.

A worker's death is a BaseException raised inside a step: it leaves run_execute with nothing settled, the
lease held, exactly as a SIGKILL would. "Advancing the clock" moves due times (lease expiry, wake_at) into
Postgres's past, since the engine reads time from Postgres's now(). Every step execution is recorded in a
side ledger together with whether the step had already committed at that moment (read on the same
connection, which the engine commits on in autocommit).

Invariants: terminal states are absorbing (until a retry), a step never executes once committed and has one
result, a running run has one lease owner and tokens only grow, nothing starts after a cancel, a wait
consumes exactly the first matching event sent after the run was created, open or not yet open (no lost-event race).
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from runs import engine, services
from runs.models import Run, RunStatus, Step, Waitpoint
from runs.ops.audit import Actor
from runs.sdk import NonRetriableError, Retry, task

pytestmark = pytest.mark.django_db(transaction=True)

TERMINAL = {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED, RunStatus.TIMED_OUT}
STEPS = 3


class WorkerDied(BaseException):
    """The worker process vanished mid-step (SIGKILL, OOM): nothing after this point happens."""


# run id -> what the next execution of one step does; consumed by that execution.
SCRIPT: dict[str, tuple[str, str]] = {}
# (run id, step key, was the step already committed when this execution began)
LEDGER: list[tuple[str, str, bool]] = []


def _act(run_id: str, key: str) -> str:
    committed = Step.objects.filter(run_id=run_id, key=key, status="completed").exists()
    LEDGER.append((run_id, key, committed))
    planned = SCRIPT.get(run_id)
    if planned and planned[0] == key:
        del SCRIPT[run_id]
        behaviour = planned[1]
        if behaviour == "fail":
            raise ConnectionError("scripted failure")
        if behaviour == "fatal":
            raise NonRetriableError("scripted non-retriable failure")
        if behaviour == "crash":
            raise WorkerDied()
        if behaviour == "cancel":  # an operator cancels while the step runs
            engine.run_request_cancel(run_id)
    return key


# A back-off long enough that a parked retry is never already due: the clock rule decides when it is.
@task("t-state-machine", retry=Retry(attempts=2, initial=5, max_delay=5))
def state_machine_task(ctx, wait: bool = False) -> list:
    out: list = []
    for i in range(1, STEPS + 1):
        out.append(ctx.step(f"s{i}", _act, ctx.run_id, f"s{i}"))
        if wait and i == 1:
            out.append(ctx.wait_for_event("ev", event="sm.event", match={"run": ctx.run_id}))
    return out


class RunLifecycle(RuleBasedStateMachine):
    runs = Bundle("runs")

    @initialize()
    def reset(self) -> None:
        SCRIPT.clear()
        LEDGER.clear()
        self.sent: list[str] = []  # wake-ups handed to the "broker"
        self.ids: list[str] = []
        self.last: dict[str, tuple[str, object]] = {}  # run -> (status, output) last seen terminal
        self.tokens: dict[str, int] = {}
        self.cancelled_at: dict[str, int] = {}  # run -> ledger length when a cancel took hold
        self.expected_event: dict[str, dict | None] = {}
        self.event_counter = 0

    # -- rules -------------------------------------------------------------------------------------------
    @precondition(lambda self: len(self.ids) < 3)  # a few runs, each driven far
    @rule(target=runs, wait=st.booleans())
    def trigger(self, wait: bool) -> str:
        with engine.enqueue_to(self.sent.append):
            run, _ = services.run_trigger(task_id="t-state-machine", payload={"wait": wait})
        run_id = str(run.pk)
        self.ids.append(run_id)
        self.expected_event[run_id] = None
        return run_id

    @rule(
        run=runs,
        step=st.sampled_from([f"s{i}" for i in range(1, STEPS + 1)]),
        behaviour=st.sampled_from(["ok", "fail", "fatal", "crash", "cancel"]),
        twice=st.booleans(),
    )
    def deliver(self, run: str, step: str, behaviour: str, twice: bool) -> None:
        before = Run.objects.get(pk=run)
        if behaviour != "ok":
            SCRIPT[run] = (step, behaviour)
        executions = len(LEDGER)
        with engine.enqueue_to(self.sent.append):
            for worker in ("worker-a", "worker-b")[: 2 if twice else 1]:
                with contextlib.suppress(WorkerDied):
                    engine.run_execute(run, worker=worker, heartbeat=False)
        SCRIPT.pop(run, None)
        if before.status != RunStatus.QUEUED:
            # Only a queued run can be claimed: a running one (live or dead worker) waits for the scheduler.
            assert not [e for e in LEDGER[executions:] if e[0] == run], (before.status, LEDGER[executions:])
        if behaviour == "cancel" and any(e[0] == run and e[1] == step for e in LEDGER[executions:]):
            # The cancel landed while `step` ran: that step may finish, no later one may start.
            landed = next(i for i, e in enumerate(LEDGER) if i >= executions and e[0] == run and e[1] == step)
            self.cancelled_at.setdefault(run, landed + 1)
            later = [e for e in LEDGER[landed + 1 :] if e[0] == run]
            assert not later, f"steps started after the cancel: {later}"

    @rule()
    def workers_drain_the_queue(self) -> None:
        """Every queued run is delivered once, its steps succeeding (the common case between faults)."""
        with engine.enqueue_to(self.sent.append):
            for run in Run.objects.filter(pk__in=self.ids, status=RunStatus.QUEUED).values_list("pk", flat=True):
                engine.run_execute(run, worker="worker-c", heartbeat=False)

    @rule(run=runs)
    def expire_lease(self, run: str) -> None:
        Run.objects.filter(pk=run, status=RunStatus.RUNNING).update(lease_expires_at=_past())

    @rule(past_leases=st.booleans())
    def advance_clock_and_tick(self, past_leases: bool) -> None:
        if past_leases:  # time passes beyond every lease: workers that stopped renewing lose their runs
            Run.objects.filter(pk__in=self.ids, status=RunStatus.RUNNING).update(lease_expires_at=_past())
        Run.objects.filter(
            pk__in=self.ids, status__in=[RunStatus.WAITING, RunStatus.DELAYED], wake_at__isnull=False
        ).update(wake_at=_past())
        with engine.enqueue_to(self.sent.append):
            engine.scheduler_tick()

    @rule(run=runs, twice=st.booleans(), with_id=st.booleans())
    def send_event(self, run: str, twice: bool, with_id: bool) -> None:
        self.event_counter += 1
        data = {"run": run, "n": self.event_counter}
        external_id = f"sm-{run}-{self.event_counter}" if with_id else ""
        with engine.enqueue_to(self.sent.append):
            for _ in range(2 if twice else 1):
                services.event_send(name="sm.event", data=data, external_id=external_id)
        if self.expected_event[run] is None:
            # No lost-event race: the first event after the run's creation is the one its wait gets, whether
            # the wait was open when it came or began later (DESIGN §3).
            self.expected_event[run] = data

    @rule(run=runs)
    def cancel(self, run: str) -> None:
        with engine.enqueue_to(self.sent.append):
            try:
                services.run_cancel(run=Run.objects.get(pk=run), by=Actor.system("tests"))
            except services.RunStateError:
                return
        self.cancelled_at.setdefault(run, len(LEDGER))

    @rule(run=runs)
    def retry(self, run: str) -> None:
        with engine.enqueue_to(self.sent.append):
            try:
                services.run_retry(run=Run.objects.get(pk=run), by=Actor.system("tests"))
            except services.RunStateError:
                return
        self.last.pop(run, None)
        self.cancelled_at.pop(run, None)

    # -- invariants ----------------------------------------------------------------------------------------
    @invariant()
    def terminal_states_are_absorbing(self) -> None:
        for run in Run.objects.filter(pk__in=self.ids):
            key = str(run.pk)
            if key in self.last:
                assert (run.status, run.output) == self.last[key], f"a finished run changed: {run.status}"
            elif run.status in TERMINAL:
                self.last[key] = (run.status, run.output)

    @invariant()
    def a_committed_step_never_executes_again(self) -> None:
        again = [e for e in LEDGER if e[2]]
        assert not again, f"committed steps executed again: {again}"
        for step in Step.objects.filter(run_id__in=self.ids, status="completed", key__startswith="s"):
            assert step.output == step.key  # the one result of that step

    @invariant()
    def one_lease_owner(self) -> None:
        for run in Run.objects.filter(pk__in=self.ids):
            key = str(run.pk)
            assert run.lease_token >= self.tokens.get(key, 0), "a lease token went backwards"
            self.tokens[key] = run.lease_token
            if run.status == RunStatus.RUNNING:
                assert run.lease_owner and run.lease_expires_at is not None
            else:
                assert run.lease_owner == "" and run.lease_expires_at is None, (run.status, run.lease_owner)

    @invariant()
    def nothing_starts_after_a_cancel(self) -> None:
        for run, at in self.cancelled_at.items():
            later = [e for e in LEDGER[at:] if e[0] == run]
            assert not later, f"run {run} started steps after its cancel: {later}"

    @invariant()
    def a_wait_consumes_one_event(self) -> None:
        for wp in Waitpoint.objects.filter(run_id__in=self.ids, kind="event"):
            expected = self.expected_event[str(wp.run_id)]
            if wp.completed_at is not None and not wp.timed_out:
                assert wp.result == expected, (wp.result, expected)
        for step in Step.objects.filter(run_id__in=self.ids, key="ev", status="completed"):
            assert step.output == self.expected_event[str(step.run_id)]


def _past():
    from datetime import timedelta

    from django.utils import timezone

    return timezone.now() - timedelta(seconds=5)


def test_the_run_state_machine_keeps_its_invariants() -> None:
    run_state_machine_as_test(
        RunLifecycle,
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
