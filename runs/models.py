"""Dex's record: runs, their steps (with every attempt), log lines and API keys.

State changes do not live here: they are conditional UPDATEs in runs/engine/ (the one module that moves
states). The partial indexes below exist for specific queries; each names the code that uses it.
"""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.db.models import Q

from runs.ids import uuid7
from runs.offload import OutputField


class RunStatus(models.TextChoices):
    DELAYED = "delayed", "Delayed"
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    WAITING = "waiting", "Waiting"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELED = "canceled", "Canceled"
    TIMED_OUT = "timed_out", "Timed out"


TERMINAL_STATUSES = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED, RunStatus.TIMED_OUT)
ACTIVE_STATUSES = (RunStatus.DELAYED, RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)


class Run(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    task_id = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    payload = models.JSONField(default=dict, blank=True)
    # A large output lives in the "dex_outputs" storage and the row keeps a reference (runs/offload.py).
    output = OutputField(null=True, blank=True, run_attname="id")
    # {"type", "message", "step", "traceback"} for a failed / timed-out run.
    error = models.JSONField(null=True, blank=True)
    tags = ArrayField(models.CharField(max_length=100), default=list, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    replay_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replays")

    queue = models.CharField(max_length=100, default="")
    priority = models.IntegerField(default=0)
    idempotency_key = models.CharField(max_length=255, blank=True, default="")
    idempotency_expires_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # When a waiting/delayed run is due (sleep, retry back-off, wait timeout, delayed trigger).
    wake_at = models.DateTimeField(null=True, blank=True)
    # When the run was last handed to the broker: the scheduler re-sends stale ones (lost wake-ups).
    enqueued_at = models.DateTimeField(null=True, blank=True)
    # Re-sends since the run was last claimed: each waits twice as long as the one before, so a long queue
    # (whose runs are unclaimed only because they wait their turn) isn't flooded with duplicate wake-ups.
    resends = models.SmallIntegerField(default=0)

    # The lease (ENGINE.md): one owner at a time; the token fences writes of an owner that lost it.
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_token = models.BigIntegerField(default=0)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    # Execution time used by finished executions (for max_duration), excluding parked time.
    executed_seconds = models.FloatField(default=0)
    # How many times this run's worker died under it (lease expired); dead-lettered past a limit.
    recoveries = models.IntegerField(default=0)
    # How many times the run was started (claims) — `ctx.attempt` outside a step.
    executions = models.IntegerField(default=0)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cost_usd = models.DecimalField(max_digits=18, decimal_places=8, default=0)
    # LLM spend this run did not pay again: memoised LLM steps reused on retries and forks, cache hits.
    saved_usd = models.DecimalField(max_digits=18, decimal_places=8, default=0)
    # An approved "budget exceeded — continue?" raises the run's own cap above the task's budget_usd.
    budget_usd = models.DecimalField(max_digits=18, decimal_places=8, null=True, blank=True)

    # The code the run started on (DEX_CODE_VERSION, else the deploy's git revision, else a hash of the task's
    # source), and the version of every execution: [{"execution", "version", "at"}] (ctx.patched, DESIGN §2).
    code_version = models.CharField(max_length=100, blank=True, default="")
    execution_versions = models.JSONField(default=list, blank=True)
    # The Postgres backend of the worker process that holds the lease: when that session is gone the worker
    # died, and the scheduler recovers the run at once instead of waiting for the lease to expire. NULL behind
    # a transaction-mode pooler, where a backend is not a process's own (DEX_DB_POOLER).
    lease_backend_pid = models.IntegerField(null=True, blank=True)
    # The step the worker is executing ({"key", "seq", "attempt", "started_at"}), recorded by the heartbeat:
    # a worker that dies under it shows that attempt as lost ("worker lost") when the step runs again.
    inflight = models.JSONField(null=True, blank=True)
    # The W3C trace context ({"traceparent", "tracestate"}) the run was created in, when tracing is on
    # (runs.integrations.otel): every execution of the run, on any worker, continues that trace.
    trace_context = models.JSONField(null=True, blank=True)

    # Flow control (runs/engine/flow.py), resolved at trigger time from the task's options and the payload: the
    # concurrency / rate-limit / debounce key of the run; NULL when the task had no such limit ("" = no key).
    # NULL and "" mean different things here, hence null=True on text (and the claim tests IS NULL).
    concurrency_key_value = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    rate_key_value = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    debounce_key_value = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    # Why a queued/delayed run waits ("waiting for a concurrency slot (2/2 running for user_id=42)"), or why
    # a debounced run was canceled. Cleared when the run is claimed.
    status_reason = models.CharField(max_length=300, blank=True, default="")

    class Meta:
        ordering = ["-id"]
        # Viewers read; operators (this permission, given to the "operator" group) act on runs.
        permissions = [("operate_runs", "Can trigger, cancel, retry, replay and fork runs and answer approvals")]
        indexes = [
            # engine.scheduler_tick: waiting/delayed runs whose wake_at is due.
            models.Index(
                fields=["wake_at"],
                name="run_due_idx",
                condition=Q(status__in=["waiting", "delayed"]),
            ),
            # engine.scheduler_tick: running runs whose lease expired (their worker died).
            models.Index(fields=["lease_expires_at"], name="run_lease_idx", condition=Q(status="running")),
            # engine.scheduler_tick: queued runs nobody claimed (lost wake-up).
            models.Index(fields=["enqueued_at"], name="run_queued_idx", condition=Q(status="queued")),
            # services.run_trigger: an idempotency key's existing run.
            models.Index(
                fields=["task_id", "idempotency_key"],
                name="run_idempotency_idx",
                condition=~Q(idempotency_key=""),
            ),
            # The run list: filter by status / task, newest first (keyset on id).
            models.Index(fields=["status", "-id"], name="run_status_idx"),
            models.Index(fields=["task_id", "-id"], name="run_task_idx"),
            GinIndex(fields=["tags"], name="run_tags_idx"),
            # flow.claim_next / flow.release_slots: a concurrency group's running runs and best queued run.
            models.Index(
                fields=["task_id", "concurrency_key_value", "status", "-priority", "id"],
                name="run_concurrency_idx",
                condition=Q(concurrency_key_value__isnull=False, status__in=["queued", "running"]),
            ),
            # flow.claim_next: the best queued run of a group limited by rate only.
            models.Index(
                fields=["task_id", "rate_key_value", "-priority", "id"],
                name="run_rate_queued_idx",
                condition=Q(rate_key_value__isnull=False, status="queued"),
            ),
            # flow.claim_next: a rate-limited group's recent starts.
            models.Index(
                fields=["task_id", "rate_key_value", "started_at"],
                name="run_rate_idx",
                condition=Q(rate_key_value__isnull=False),
            ),
            # flow.debounce_trigger: the pending (delayed) run of a debounce key.
            models.Index(
                fields=["task_id", "debounce_key_value"],
                name="run_debounce_idx",
                condition=Q(debounce_key_value__isnull=False, status="delayed"),
            ),
            # The run list's version filter.
            models.Index(fields=["code_version", "-id"], name="run_version_idx", condition=~Q(code_version="")),
            # engine.scheduler_tick: rate-limited queued runs whose window opened (flow.claim_next set wake_at).
            models.Index(fields=["wake_at"], name="run_throttled_idx", condition=Q(status="queued")),
            # retention.runs_prune: finished runs, oldest first.
            models.Index(
                fields=["finished_at"],
                name="run_finished_idx",
                condition=Q(status__in=["completed", "failed", "canceled", "timed_out"]),
            ),
            # alerts.alerts_scan: recently failed / timed-out runs that have no alert yet (a lost settle hook).
            models.Index(
                fields=["finished_at"], name="run_failed_finished_idx", condition=Q(status__in=["failed", "timed_out"])
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} {self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        from django.utils import timezone

        end = self.finished_at or timezone.now()
        return (end - self.started_at).total_seconds()


class StepKind(models.TextChoices):
    STEP = "step", "Step"
    TRANSACTION = "transaction", "Transaction"
    SLEEP = "sleep", "Sleep"
    EVENT = "event", "Wait for event"
    APPROVAL = "approval", "Wait for approval"
    INVOKE = "invoke", "Child run"
    MAP = "map", "Fan-out"
    AI = "ai", "LLM call"
    COMPENSATE = "compensate", "Compensation"
    # ctx.patched: a marker that this run reached the patch under code that has it (no function runs).
    PATCH = "patch", "Patch"


class StepStatus(models.TextChoices):
    COMPLETED = "completed", "Completed"
    # An attempt failed and the step waits for its back-off before the next attempt.
    RETRYING = "retrying", "Retrying"
    FAILED = "failed", "Failed"
    WAITING = "waiting", "Waiting"


class Step(models.Model):
    """One named step of a run. Written when it settles (completed, failed, retrying, waiting): a step costs
    one commit. Every attempt's error, traceback and timings are kept in `history`."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps")
    seq = models.IntegerField()
    key = models.CharField(max_length=300)
    kind = models.CharField(max_length=16, choices=StepKind.choices, default=StepKind.STEP)
    status = models.CharField(max_length=16, choices=StepStatus.choices)
    # Attempts made in all; `budget_used` counts those since the last manual retry (what Retry limits).
    attempts = models.IntegerField(default=1)
    budget_used = models.IntegerField(default=1)
    # A large output lives in the "dex_outputs" storage and the row keeps a reference (runs/offload.py).
    output = OutputField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    # [{"attempt", "started_at", "finished_at", "error": {"type", "message", "traceback"}}, ...]
    history = models.JSONField(default=list, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    wake_at = models.DateTimeField(null=True, blank=True)
    # Kind-specific data: what a wait waits for, LLM usage, the compensation registered...
    meta = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["run", "seq"]
        indexes = [
            # selectors.llm_usage_by_task_and_day: LLM steps by when they finished.
            models.Index(fields=["finished_at"], name="step_ai_finished_idx", condition=Q(kind="ai")),
        ]
        constraints = [
            # What makes memoisation safe: one committed result per step key per run.
            models.UniqueConstraint(fields=["run", "key"], name="step_run_key_uniq"),
            models.UniqueConstraint(fields=["run", "seq"], name="step_run_seq_uniq"),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class LogLine(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="logs")
    step_key = models.CharField(max_length=300, blank=True, default="")
    ts = models.DateTimeField()
    level = models.CharField(max_length=10, default="INFO")
    message = models.TextField()
    # A line of agent code outside steps: "<seq>.<n>", the n-th line logged before step number seq. Code re-runs
    # on every execution of the run; this makes its lines count once per run (engine.context).
    origin = models.CharField(max_length=40, null=True, blank=True)  # noqa: DJ001

    class Meta:
        ordering = ["run", "id"]
        indexes = [models.Index(fields=["run", "id"], name="logline_run_idx")]
        constraints = [
            models.UniqueConstraint(
                fields=["run", "origin"], name="logline_origin_uniq", condition=Q(origin__isnull=False)
            )
        ]

    def __str__(self) -> str:
        return f"[{self.level}] {self.message[:80]}"


class ApiKeyScope(models.TextChoices):
    """What an API key may do (README "Security"): each API endpoint requires one scope."""

    READ = "read", "Read tasks and runs (and stream a run's events)"
    TRIGGER = "trigger", "Start runs"
    EVENTS = "events", "Send events and complete waitpoints"
    OPERATE = "operate", "Cancel, retry and replay runs"


def apikey_all_scopes() -> list[str]:
    """Every scope: the default, so keys made before scopes existed keep working as they did."""
    return [scope.value for scope in ApiKeyScope]


class ApiKey(models.Model):
    """An API key. Only the SHA-256 of the secret is kept; the key itself is shown once, at creation."""

    PREFIX = "dex_"

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, help_text="The first characters, to recognise a key.")
    key_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    scopes = ArrayField(models.CharField(max_length=16, choices=ApiKeyScope.choices), default=apikey_all_scopes)
    # None: the key never expires.
    expires_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def hash(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    @classmethod
    def generate(
        cls, *, name: str, created_by=None, scopes: list[str] | None = None, expires_at=None
    ) -> tuple[ApiKey, str]:
        secret = cls.PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            name=name,
            prefix=secret[:12],
            key_hash=cls.hash(secret),
            created_by=created_by,
            scopes=apikey_all_scopes() if scopes is None else list(scopes),
            expires_at=expires_at,
        )
        return key, secret

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def is_expired(self, now=None) -> bool:
        from django.utils import timezone

        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class ScheduleSource(models.TextChoices):
    # Declared by `@task(schedule=...)`: synced from code when a scheduler starts, not edited by hand.
    CODE = "code", "Declared in code"
    USER = "user", "Created by a user"


class Schedule(models.Model):
    """A cron schedule that starts runs of a task. Written through runs/ops/schedules.py, which validates it
    and keeps `next_run_at` (the next slot, in UTC) in step with `cron` and `timezone`."""

    task_id = models.CharField(max_length=200)
    # Five fields (minute hour day-of-month month day-of-week), read in `timezone`.
    cron = models.CharField(max_length=100)
    timezone = models.CharField(max_length=64, default="UTC", help_text="An IANA time zone, e.g. Europe/Paris.")
    payload = models.JSONField(default=dict, blank=True)
    enabled = models.BooleanField(default=True)
    source = models.CharField(max_length=8, choices=ScheduleSource.choices, default=ScheduleSource.USER)
    # The slot the schedule fires next; NULL while disabled.
    next_run_at = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_run = models.ForeignKey(Run, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Why the last slot started no run (the task vanished, its payload no longer validates); "" if it did.
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["task_id", "id"]
        indexes = [
            # schedules.schedules_fire (and its idle "is anything due" probe): enabled schedules by next slot.
            models.Index(fields=["next_run_at"], name="schedule_due_idx", condition=Q(enabled=True)),
        ]
        constraints = [
            # schedules.schedules_sync_from_code: a task's code schedule is synced in place, never duplicated.
            models.UniqueConstraint(
                fields=["task_id", "source"], condition=Q(source="code"), name="schedule_code_task_uniq"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} {self.cron} ({self.timezone})"


class Event(models.Model):
    """An event received through the API (`POST /api/events`): resumes matching waits, starts subscribed
    tasks. A client-given `external_id` makes delivery idempotent: the same id is accepted once."""

    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    name = models.CharField(max_length=200)
    data = models.JSONField(default=dict, blank=True)
    external_id = models.CharField(max_length=255, blank=True, default="")
    received_at = models.DateTimeField(auto_now_add=True)
    # What the event did: {"resumed": [run ids], "started": [run ids], "errors": [...]}
    outcome = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            # services.event_send: INSERT ... ON CONFLICT on this index is what makes an event id count once.
            models.UniqueConstraint(
                fields=["external_id"], condition=~Q(external_id=""), name="event_external_id_uniq"
            ),
        ]
        indexes = [
            models.Index(fields=["name", "-id"], name="event_name_idx"),
            # engine.waits: an event that arrived before its wait began, by containment of the wait's `match`.
            GinIndex(fields=["data"], name="event_data_idx", opclasses=["jsonb_path_ops"]),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"


class WaitpointKind(models.TextChoices):
    EVENT = "event", "Event"
    APPROVAL = "approval", "Approval"


class Waitpoint(models.Model):
    """What a parked run waits for (an event or a person), completed once: by a matching event, by its
    token through the API or the dashboard, or by its timeout — whichever comes first."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="waitpoints")
    step_key = models.CharField(max_length=300)
    kind = models.CharField(max_length=16, choices=WaitpointKind.choices)
    token = models.CharField(max_length=64, unique=True)
    event_name = models.CharField(max_length=200, blank=True, default="")
    # The event's data must contain this (jsonb containment: data @> match).
    match = models.JSONField(default=dict, blank=True)
    # `match` as canonical JSON when it is flat (at most a few top-level keys with scalar values): an event
    # then finds its waits by index probes on (event_name, match_key) — engine.waits.match_keys. NULL otherwise.
    match_key = models.TextField(null=True, blank=True)  # noqa: DJ001
    # Events received from this moment on count for the wait (the run's creation, or the wait's start minus
    # its `lookback`): an event sent before the wait began is not lost (DESIGN §3).
    events_after = models.DateTimeField(null=True, blank=True)
    prompt = models.TextField(blank=True, default="")
    # Dotted path of the Django Form class validating an approval's data.
    form = models.CharField(max_length=300, blank=True, default="")
    timeout_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    timed_out = models.BooleanField(default=False)
    result = models.JSONField(null=True, blank=True)
    event = models.ForeignKey(Event, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    completed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step_key"], name="waitpoint_run_step_uniq"),
            # Each event is consumed at most once per run.
            models.UniqueConstraint(
                fields=["run", "event"], name="waitpoint_run_event_uniq", condition=Q(event__isnull=False)
            ),
        ]
        indexes = [
            # engine.waits.event_deliver: the open flat waits for an event, found by probes of its match keys.
            models.Index(
                fields=["event_name", "match_key"],
                name="waitpoint_open_match_idx",
                condition=Q(completed_at__isnull=True, kind="event", match_key__isnull=False),
            ),
            # engine.waits.event_deliver: the open waits whose match is not flat (scanned with @>).
            models.Index(
                fields=["event_name"],
                name="waitpoint_open_event_idx",
                condition=Q(completed_at__isnull=True, kind="event", match_key__isnull=True),
            ),
            # The approvals page: pending approvals, oldest first.
            models.Index(fields=["created_at"], name="waitpoint_open_idx", condition=Q(completed_at__isnull=True)),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.step_key} of run {self.run_id}"

    @property
    def is_pending(self) -> bool:
        return self.completed_at is None


class AuditEntry(models.Model):
    """Who did what to which runs, and when: every operator action (dashboard, admin, bulk)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    username = models.CharField(max_length=150, blank=True, default="")  # kept if the user is deleted
    action = models.CharField(max_length=50)
    run_ids = ArrayField(models.UUIDField(), default=list, blank=True)
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["-created_at"], name="audit_created_idx")]

    def __str__(self) -> str:
        return f"{self.username or 'system'} {self.action} ({len(self.run_ids)} runs)"


class StepChunk(models.Model):
    """LLM tokens of a streaming step, stored as they arrive (in small batches), so a page opened or
    reconnected mid-stream shows the whole text so far. The step's row is written only when it settles."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="chunks")
    step_key = models.CharField(max_length=300)
    attempt = models.IntegerField(default=1)
    seq = models.IntegerField()
    text = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run", "step_key", "attempt", "seq"]
        indexes = [models.Index(fields=["run", "step_key", "attempt", "seq"], name="stepchunk_idx")]

    def __str__(self) -> str:
        return f"{self.step_key}#{self.seq}"


class LlmCacheEntry(models.Model):
    """A response keyed by the hash of its request (model, messages, params, tools): an identical call in a
    replay or fork is answered from here and never paid twice."""

    request_hash = models.CharField(max_length=64, unique=True)
    model = models.CharField(max_length=200)
    # {"text", "tool_calls", "finish_reason", "model", "provider"}
    response = models.JSONField()
    usage = models.JSONField(default=dict)
    cost_usd = models.DecimalField(max_digits=18, decimal_places=8, default=0)
    hits = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.model} {self.request_hash[:12]}"


# --- alerts (runs/ops/alerts.py) ------------------------------------------------------------------------------------


class AlertKind(models.TextChoices):
    FAILED = "failed", "Run failed"
    TIMED_OUT = "timed_out", "Run timed out"
    STUCK = "stuck", "Run waiting too long"
    TEST = "test", "Test alert"


class AlertChannel(models.TextChoices):
    WEBHOOK = "webhook", "Webhook"
    EMAIL = "email", "Email"


class AlertDestination(models.Model):
    """Where alerts go, edited in the dashboard (settings and `@task(alerts=...)` add more, not stored here)."""

    kind = models.CharField(max_length=8, choices=AlertChannel.choices)
    # A URL (webhook) or an email address.
    target = models.CharField(max_length=500)
    # Signs webhook bodies (Dex-Signature); generated when left blank.
    secret = models.CharField(max_length=200, blank=True, default="")
    # The alert kinds sent here; empty = failed, timed_out and stuck.
    events = ArrayField(models.CharField(max_length=16), default=list, blank=True)
    # Only runs of tasks matching this glob (e.g. "billing-*"); empty = every task.
    task_filter = models.CharField(max_length=200, blank=True, default="")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.target}"


class Alert(models.Model):
    """Something worth telling a person: one per run per kind (the constraint makes raising it idempotent)."""

    run = models.ForeignKey(Run, null=True, blank=True, on_delete=models.CASCADE, related_name="alerts")
    kind = models.CharField(max_length=16, choices=AlertKind.choices)
    task_id = models.CharField(max_length=200, blank=True, default="")
    # The JSON body every webhook destination receives (the email says the same in words).
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            # alerts.alert_raise: INSERT ... ON CONFLICT on this index is what sends one alert per run and kind.
            models.UniqueConstraint(fields=["run", "kind"], name="alert_run_kind_uniq"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} alert for run {self.run_id}"


class AlertDeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"


class AlertDelivery(models.Model):
    """One alert to one destination. Sent by the `dex.deliver_alert` Celery task, retried with back-off;
    every attempt is kept in `history`."""

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    destination = models.ForeignKey(
        AlertDestination, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries"
    )
    channel = models.CharField(max_length=8, choices=AlertChannel.choices)
    target = models.CharField(max_length=500)
    status = models.CharField(max_length=10, choices=AlertDeliveryStatus.choices, default=AlertDeliveryStatus.PENDING)
    attempts = models.IntegerField(default=0)
    # When the next attempt is due (NULL once delivered or given up); while an attempt is in flight, when it
    # counts as lost (the sender died) and may be taken again.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    response_status = models.IntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    # [{"attempt", "at", "ok", "status", "error", "ms"}, ...]
    history = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [models.UniqueConstraint(fields=["alert", "channel", "target"], name="alertdelivery_target_uniq")]
        indexes = [
            # alerts.alerts_scan: pending deliveries whose message was lost or whose retry is due.
            models.Index(fields=["next_attempt_at"], name="alertdelivery_due_idx", condition=Q(status="pending")),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.target} ({self.status})"
