"""The pauses of a run context: durable timers, waits for an event or a person, child runs, and patches.

A pause parks the run (settle.run_park: one transaction, the lease released, no worker held) and raises Parked;
the run executes again from the top when its wait ends, and the pause returns what ended it. What a pause waits
for is recorded when it begins — a sleep's wake-up time, a wait's timeout and event window — and read back on
every later execution, so a run cancelled and retried, or recovered after a crash, waits only for what is left
(DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

from runs.engine.create import child_idempotency_key, run_create
from runs.engine.errors import LeaseLost, Parked
from runs.engine.plan import NO_RETRY, StepPlan, step_row
from runs.engine.settle import run_park
from runs.engine.waits import waitpoint_outcome
from runs.models import TERMINAL_STATUSES, Run, RunStatus, StepKind, StepStatus
from runs.sdk import ChildRunFailed, Task
from runs.sdk.registry import registry

if TYPE_CHECKING:
    from runs.engine.lease import Buffer, Claim, StepRecord


class Pauses:
    """Mixed into RunContext (context.py), whose state and step machinery these methods use."""

    _claim: Claim
    _buffer: Buffer
    _recorded: list[StepRecord]
    _seq: int
    _completed: int
    _unwritten_saved: Decimal
    _patches: dict[str, bool]

    if TYPE_CHECKING:

        def _guard(self) -> None: ...
        def _halt(self, stop: BaseException) -> NoReturn: ...
        def _unique_key(self, key: str) -> str: ...
        def _next_recorded(self, key: str) -> StepRecord | None: ...
        def _check_boundary(self) -> None: ...
        def _encode(self, plan: StepPlan, value: Any) -> tuple[str, str]: ...
        def _write(self, row: dict, *, cost: Decimal | None = None, saved: Decimal | None = None) -> None: ...
        def _step_event(self, plan: StepPlan, status: str, **changes: Any) -> dict[str, Any]: ...
        def _publish_step(self, plan: StepPlan, status: str, **changes: Any) -> None: ...

    # -- the common shape ------------------------------------------------------------------------------------
    def _pause_begin(self, id: str, kind: str) -> tuple[StepPlan, StepRecord | None]:
        self._guard()
        key = self._unique_key(id)
        rec = self._next_recorded(key)
        self._check_boundary()
        return StepPlan(key, rec.seq if rec else self._seq, kind, 1, 1, NO_RETRY, None), rec

    def _park(
        self,
        *,
        step: dict,
        wake_at: datetime | None,
        event: dict,
        waitpoint: dict | None = None,
        children: Callable[[], list[str]] | None = None,
        awaiting: list[str] | None = None,
    ) -> NoReturn:
        """Record `step` and set the run waiting until `wake_at`, releasing the lease; raise Parked."""
        saved, self._unwritten_saved = self._unwritten_saved, Decimal(0)
        parked = run_park(
            self._claim,
            self._buffer,
            step=step,
            wake_at=wake_at,
            event=event,
            waitpoint=waitpoint,
            children=children,
            awaiting=awaiting,
            saved=saved,
        )
        self._halt(Parked() if parked else LeaseLost())

    def _complete_wait(self, plan: StepPlan, *, output: Any) -> None:
        """The pause ended: commit it as a completed step now, before the pause returns (durable return)."""
        text, stored = self._encode(plan, output)
        self._write(step_row(plan, status=StepStatus.COMPLETED, output=stored, finished=self._claim.now()))
        self._seq += 1
        self._completed += 1
        self._publish_step(plan, "completed", finished=self._claim.now(), output_text=text)

    # -- durable timers ------------------------------------------------------------------------------
    def sleep(self, id: str, duration: timedelta | float) -> None:
        """Park the run for `duration` (a timedelta or seconds): no worker is held while it sleeps."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
        self._sleep(id, lambda: self._claim.now() + timedelta(seconds=max(seconds, 0)))

    def sleep_until(self, id: str, when: datetime) -> None:
        """Park the run until `when` (an aware datetime)."""
        if when.tzinfo is None:
            raise ValueError("sleep_until needs an aware datetime (with a timezone)")
        self._sleep(id, lambda: when)

    def _sleep(self, id: str, wake_at: Callable[[], datetime]) -> None:
        plan, rec = self._pause_begin(id, StepKind.SLEEP)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return
        # The wake-up time recorded when the sleep began is the truth: a run cancelled and retried (or
        # recovered) sleeps only what is left of it.
        when = rec.wake_at if rec is not None else wake_at()
        if when is None or when <= self._claim.now():
            self._complete_wait(plan, output=None)
            return
        self._park(
            step=step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=when),
            wake_at=when,
            event=self._step_event(plan, "waiting", wake_at=when),
        )

    # -- waits for an event or a person ------------------------------------------------------------------
    def wait_for_event(
        self,
        id: str,
        *,
        event: str,
        match: dict | None = None,
        timeout: timedelta | float | None = None,
        lookback: timedelta | float | None = None,
    ) -> Any:
        """Park until an event named `event` whose data contains `match` arrives; return its data, or None
        after `timeout`. An event counts if it arrived after the run was created (an event sent before the wait
        began is not lost) and no earlier wait of this run consumed it; `lookback` moves the window's start to
        that long before the wait began (`lookback=0`: only events after the wait began)."""
        if not event:
            raise ValueError("wait_for_event needs an event name")
        if isinstance(lookback, int | float):
            lookback = timedelta(seconds=lookback)
        return self._wait(
            id,
            kind=StepKind.EVENT,
            timeout=timeout,
            waitpoint={"event_name": event, "match": match or {}},
            lookback=lookback,
        )

    def wait_for_approval(
        self, id: str, *, prompt: str, form: type | None = None, timeout: timedelta | float | None = None
    ) -> dict | None:
        """Park until a person approves or rejects (dashboard, or the API with the waitpoint's token).
        Returns {"approved", "by", "comment", "data"} (data validated by `form`), or None after `timeout`."""
        form_path = f"{form.__module__}.{form.__qualname__}" if form is not None else ""
        return self._wait(id, kind=StepKind.APPROVAL, timeout=timeout, waitpoint={"prompt": prompt, "form": form_path})

    def _wait(
        self,
        id: str,
        *,
        kind: str,
        timeout: timedelta | float | None,
        waitpoint: dict,
        lookback: timedelta | None = None,
    ) -> Any:
        plan, rec = self._pause_begin(id, kind)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return rec.output
        if rec is not None:
            # The wait began in an earlier execution: its waitpoint (and timeout) is the truth.
            outcome = waitpoint_outcome(run_id=self._claim.run_id, step_key=plan.key)
            if outcome.done:
                self._complete_wait(plan, output=outcome.result)
                return outcome.result
            self._park(
                step=step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=outcome.timeout_at),
                wake_at=outcome.timeout_at,
                event=self._step_event(plan, "waiting", wake_at=outcome.timeout_at),
            )
        began = self._claim.now()
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        timeout_at = began + timedelta(seconds=seconds) if seconds is not None else None
        if kind == StepKind.EVENT and lookback is not None:
            waitpoint["events_after"] = began - lookback  # else: events newer than the run (engine.waits)
        meta = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in waitpoint.items()}
        self._park(
            step=step_row(plan, status=StepStatus.WAITING, finished=None, wake_at=timeout_at, meta=meta),
            wake_at=timeout_at,
            event=self._step_event(plan, "waiting", wake_at=timeout_at),
            waitpoint={"kind": kind, "step_key": plan.key, "timeout_at": timeout_at, **waitpoint},
        )

    # -- child runs -------------------------------------------------------------------------------------
    def invoke(self, id: str, task: Task | str, payload: dict | None = None) -> Any:
        """Start a child run of `task` and park until it finishes; its output, or ChildRunFailed."""
        (outcome,) = self._children(id, StepKind.INVOKE, task, [payload or {}])
        return child_output(outcome)

    def map(self, id: str, task: Task | str, payloads: list[dict]) -> list[Any]:
        """Fan out one child run per payload, park until all finish, fan in their outputs in order.
        Raises ChildRunFailed (naming the first failed child) if any failed."""
        return [child_output(outcome) for outcome in self._children(id, StepKind.MAP, task, list(payloads))]

    def _children(self, id: str, kind: str, task: Task | str, payloads: list[dict]) -> list[dict]:
        task_id = task if isinstance(task, str) else task.id
        plan, rec = self._pause_begin(id, kind)
        if rec is not None and rec.status == StepStatus.COMPLETED:
            self._seq += 1
            return rec.output
        if rec is not None:
            children = rec.meta.get("children", [])
            outcomes = children_outcomes(children)
            if outcomes is not None:
                self._complete_wait(plan, output=outcomes)
                return outcomes
            # Not all children finished: park again (each child wakes the parent when it ends; one that ends
            # between this read and the park is caught by the park itself).
            self._park(
                step=step_row(plan, status=StepStatus.WAITING, finished=None, meta={"children": children}),
                wake_at=None,
                event=self._step_event(plan, "waiting", children=children),
                awaiting=children,
            )
        child_task = registry.get(task_id)  # an unknown task fails this run here, with a clear error
        if not payloads:
            self._complete_wait(plan, output=[])
            return []
        parent_id = self._claim.run_id

        def start_children() -> list[str]:
            ids = []
            for i, payload in enumerate(payloads):
                child, _ = run_create(
                    task=child_task,
                    payload=child_task.validate_payload(payload),
                    parent_id=parent_id,
                    idempotency_key=child_idempotency_key(parent_id, plan.key, i),
                )
                ids.append(str(child.id))
            return ids

        self._park(
            step=step_row(plan, status=StepStatus.WAITING, finished=None),
            wake_at=None,
            event=self._step_event(plan, "waiting"),
            children=start_children,
        )

    # -- versions ----------------------------------------------------------------------------------------
    def patched(self, id: str) -> bool:
        """Temporal's patching, for code shipped while runs are in flight:

            if ctx.patched("v2-summary"):
                summary = ctx.step("summarise-v2", ...)   # runs that reach this point under the new code
            else:
                summary = ctx.step("summarise", ...)      # runs whose history was written before the patch

        True where the run reaches this point for the first time under code that has the patch (recorded, so
        later executions agree); False where the run's history was written before the patch existed."""
        self._guard()
        if id in self._patches:
            return self._patches[id]
        key = f"patch:{id}"
        if self._seq < len(self._recorded):
            answer = self._recorded[self._seq].key == key
            if answer:
                self._seq += 1
        else:
            self._check_boundary()
            plan = StepPlan(key, self._seq, StepKind.PATCH, 1, 1, NO_RETRY, None)
            self._write(step_row(plan, status=StepStatus.COMPLETED, output="true", finished=plan.started))
            self._seq += 1
            answer = True
        self._patches[id] = answer
        return answer


def children_outcomes(children: list[str]) -> list[dict] | None:
    """Each child's {run, status, output, error} in order, or None while any is still unfinished."""
    rows = {str(r["id"]): r for r in Run.objects.filter(pk__in=children).values("id", "status", "output", "error")}
    if len(rows) < len(children) or any(r["status"] not in TERMINAL_STATUSES for r in rows.values()):
        return None
    return [
        {"run": child, "status": rows[child]["status"], "output": rows[child]["output"], "error": rows[child]["error"]}
        for child in children
    ]


def child_output(outcome: dict) -> Any:
    if outcome["status"] == RunStatus.COMPLETED:
        return outcome["output"]
    error = outcome.get("error") or {}
    message = error.get("message") or outcome["status"]
    raise ChildRunFailed(
        f"child run {outcome['run']} ended {outcome['status']}: {message}", run_id=outcome["run"], error=error
    )
