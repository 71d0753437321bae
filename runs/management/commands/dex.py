"""The operator's command line, thin over runs.services:

    manage.py dex trigger TASK [--payload JSON|@file] [--idempotency-key K] [--tag T] [--delay S] [--wait]
    manage.py dex runs [--status S] [--task T] [--limit N]
    manage.py dex cancel RUN_ID
    manage.py dex retry RUN_ID
    manage.py dex events send NAME [--data JSON|@file] [--id ID]
    manage.py dex events list [--name NAME] [--limit N]
    manage.py dex cassette export RUN_ID -o FILE   (the run's LLM exchanges, secrets redacted; `-o -`: stdout)

Every action is recorded in the audit log (as the --user given, else unattributed, with `via: cli` and the
OS user). Bad input is a CommandError (exit status 1) that says what to fix; `trigger --wait` also exits 1
when the run did not complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pydantic
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from runs import services
from runs.ai import cassettes
from runs.engine.create import MAX_DELAY_SECONDS, IdempotencyConflict
from runs.models import Event, Run, RunStatus
from runs.ops.audit import Actor
from runs.sdk.registry import UnknownTask, registry
from runs.services import event_send
from runs.text import describe, find_unstorable, unstorable_option

MAX_LIMIT = 1000


class Command(BaseCommand):
    help = "Trigger, list, cancel and retry runs, and send or list events (the operator's CLI)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", help="Record actions in the audit log as this Django user.")
        actions = parser.add_subparsers(
            dest="action", required=True, metavar="{trigger,runs,cancel,retry,events,cassette}"
        )

        trigger = actions.add_parser("trigger", help="Start a run of a task and print its id.")
        trigger.add_argument("task", help="The task id (see `manage.py dex runs` or /tasks/).")
        trigger.add_argument("--payload", default="{}", help="The payload as JSON, or @path to a JSON file.")
        trigger.add_argument("--idempotency-key", default="", help="A repeated key returns the existing run.")
        trigger.add_argument("--tag", action="append", default=[], help="A tag (repeatable).")
        trigger.add_argument("--delay", type=float, default=None, help="Start after this many seconds.")
        trigger.add_argument("--wait", action="store_true", help="Wait for the run to finish and print its output.")
        trigger.add_argument("--timeout", type=float, default=600.0, help="With --wait: give up after this long.")

        runs = actions.add_parser("runs", help="List runs, newest first.")
        runs.add_argument("--status", help=f"One of: {', '.join(RunStatus.values)}.")
        runs.add_argument("--task", help="Only runs of this task.")
        runs.add_argument("--limit", type=int, default=20, help=f"At most this many (1-{MAX_LIMIT}).")

        for name, text in (("cancel", "Cancel a run (and its children)."), ("retry", "Retry a failed run.")):
            sub = actions.add_parser(name, help=text)
            sub.add_argument("run_id", help="The run's id.")

        events = actions.add_parser("events", help="Send or list events.")
        event_actions = events.add_subparsers(dest="events_action", required=True, metavar="{send,list}")
        send = event_actions.add_parser("send", help="Send an event: resumes matching waits, starts subscribers.")
        send.add_argument("name", help="The event name, e.g. order.paid.")
        send.add_argument("--data", default="{}", help="The event data as JSON, or @path to a JSON file.")
        send.add_argument("--id", default="", help="An id: the same id is accepted once.")
        listing = event_actions.add_parser("list", help="List recent events.")
        listing.add_argument("--name", help="Only events of this name.")
        listing.add_argument("--limit", type=int, default=20, help=f"At most this many (1-{MAX_LIMIT}).")

        cassette = actions.add_parser("cassette", help="LLM cassettes for tests (runs.testing.run_task).")
        cassette_actions = cassette.add_subparsers(dest="cassette_action", required=True, metavar="{export}")
        export = cassette_actions.add_parser(
            "export", help="Write the LLM exchanges a run made (and its child runs), secrets redacted."
        )
        export.add_argument("run_id", help="The run's id.")
        export.add_argument("-o", "--output", required=True, help="The cassette file to write ('-': stdout).")

    def handle(self, *args: Any, action: str, user: str | None = None, **options: Any) -> None:
        problem = unstorable_option({"user": user, **options})
        if problem:
            raise CommandError(problem)
        self.actor = Actor.cli(_user(user))
        if action == "trigger":
            self.trigger(options)
        elif action == "runs":
            self.list_runs(status=options["status"], task=options["task"], limit=_limit(options["limit"]))
        elif action == "cancel":
            run = _run(options["run_id"])
            try:
                run = services.run_cancel(run=run, by=self.actor)
            except services.RunStateError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"Cancel requested for run {run.pk} ({run.status}).")
        elif action == "retry":
            run = _run(options["run_id"])
            try:
                run = services.run_retry(run=run, by=self.actor)
            except services.RunStateError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"Retrying run {run.pk} from its failed step ({run.status}).")
        elif action == "cassette":
            self.export_cassette(_run(options["run_id"]), options["output"])
        elif options["events_action"] == "send":
            self.send_event(options["name"], _json(options["data"], "--data"), options["id"])
        else:
            self.list_events(name=options["name"], limit=_limit(options["limit"]))

    def trigger(self, options: dict[str, Any]) -> None:
        task_id = options["task"]
        payload = _json(options["payload"], "--payload")
        if not isinstance(payload, dict):
            raise CommandError('--payload must be a JSON object, e.g. \'{"topic": "x"}\'')
        if options["delay"] is not None and options["delay"] < 0:
            raise CommandError("--delay must not be negative")
        if options["delay"] is not None and not options["delay"] <= MAX_DELAY_SECONDS:
            raise CommandError(f"--delay must be at most {MAX_DELAY_SECONDS:,} seconds (about ten years)")
        try:
            run, created = services.run_trigger(
                task_id=task_id,
                payload=payload,
                idempotency_key=options["idempotency_key"] or None,
                tags=options["tag"],
                delay=options["delay"],
                by=self.actor,
                strict_idempotency=True,
            )
        except IdempotencyConflict as exc:
            raise CommandError(str(exc)) from None
        except UnknownTask:
            known = ", ".join(t.id for t in registry.all()) or "none registered"
            raise CommandError(f"unknown task {task_id!r}; known tasks: {known}") from None
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors())
            raise CommandError(f"invalid payload for {task_id}: {problems}") from None
        if not created:
            self.stderr.write(f"Idempotency key already used: this is the existing run ({run.status}).")
        self.stdout.write(str(run.pk))
        if options["wait"]:
            self._wait(run, options["timeout"])

    def _wait(self, run: Run, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not run.is_terminal:
            if time.monotonic() > deadline:
                raise CommandError(f"run {run.pk} is still {run.status} after {timeout:g}s; follow it with dex runs")
            time.sleep(0.2)
            run.refresh_from_db()
        if run.status == RunStatus.COMPLETED:
            self.stdout.write(json.dumps(run.output, indent=2, default=str))
            return
        error = run.error or {}
        message = f": {error.get('type', '')}: {error.get('message', '')}" if error else ""
        raise CommandError(f"run {run.pk} ended {run.status}{message}")

    def list_runs(self, *, status: str | None, task: str | None, limit: int) -> None:
        runs = Run.objects.order_by("-id")
        if status:
            if status not in RunStatus.values:
                raise CommandError(f"unknown status {status!r}; choose from {', '.join(RunStatus.values)}")
            runs = runs.filter(status=status)
        if task:
            runs = runs.filter(task_id=task)
        rows = list(runs.only("id", "task_id", "status", "created_at", "started_at", "finished_at", "cost_usd")[:limit])
        if not rows:
            self.stdout.write("No runs match.")
            return
        self.stdout.write(f"{'ID':<36}  {'TASK':<28} {'STATUS':<10} {'CREATED':<19} {'DURATION':>9} {'COST $':>10}")
        for run in rows:
            duration = f"{run.duration_seconds:.1f}s" if run.duration_seconds is not None else "-"
            created = timezone.localtime(run.created_at).strftime("%Y-%m-%d %H:%M:%S")
            self.stdout.write(
                f"{run.pk!s:<36}  {run.task_id[:28]:<28} {run.status:<10} {created:<19} {duration:>9} "
                f"{run.cost_usd:>10.4f}"
            )

    def send_event(self, name: str, data: Any, external_id: str) -> None:
        name = name.strip()
        if not name:
            raise CommandError("the event name must not be empty")
        if len(name) > Event._meta.get_field("name").max_length:
            raise CommandError("the event name is too long (at most 200 characters)")
        if len(external_id) > Event._meta.get_field("external_id").max_length:
            raise CommandError("--id is too long (at most 255 characters)")
        event, created = event_send(name=name, data=data, external_id=external_id, by=self.actor)
        outcome = event.outcome or {}
        resumed, started = outcome.get("resumed", []), outcome.get("started", [])
        if not created:
            self.stdout.write(f"An event with id {external_id!r} was already received ({event.pk}); nothing sent.")
            return
        self.stdout.write(f"Sent {event.name} ({event.pk}): resumed {len(resumed)} run(s), started {len(started)}.")
        for error in outcome.get("errors", []):
            self.stderr.write(f"  could not start {error.get('task')}: {error.get('message')}")

    def export_cassette(self, run: Run, output: str) -> None:
        exported = cassettes.export_run(run)
        exchanges, header = exported["exchanges"], exported["header"]
        if not exchanges:
            raise CommandError(f"run {run.pk} made no recorded LLM exchange: there is nothing to put in a cassette")
        if output == "-":
            self.stdout.write(cassettes.dump(exchanges, **header), ending="")
        else:
            try:
                cassettes.save(output, exchanges, **header)
            except OSError as exc:
                raise CommandError(f"cannot write {output}: {exc.strerror or exc}") from None
            self.stderr.write(f"Wrote {len(exchanges)} exchange(s) of run {run.pk} to {output}.")
        for key in header.get("unrecorded_steps", []):
            self.stderr.write(f"  step {key!r} recorded no request (made by an older Dex): left out")

    def list_events(self, *, name: str | None, limit: int) -> None:
        events = Event.objects.order_by("-id")
        if name:
            events = events.filter(name=name)
        rows = list(events[:limit])
        if not rows:
            self.stdout.write("No events match.")
            return
        self.stdout.write(f"{'ID':<36}  {'NAME':<28} {'RECEIVED':<19} {'RESUMED':>7} {'STARTED':>7}  EXTERNAL ID")
        for event in rows:
            outcome = event.outcome or {}
            received = timezone.localtime(event.received_at).strftime("%Y-%m-%d %H:%M:%S")
            self.stdout.write(
                f"{event.pk!s:<36}  {event.name[:28]:<28} {received:<19} {len(outcome.get('resumed', [])):>7} "
                f"{len(outcome.get('started', [])):>7}  {event.external_id}"
            )


def _json(value: str, option: str) -> Any:
    """JSON text, or `@path` to a file holding it."""
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            value = path.read_text()
        except OSError as exc:
            raise CommandError(f"{option}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{option} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    found = find_unstorable(parsed)
    if found:
        raise CommandError(f"{option}: {describe(found)}")
    return parsed


def _run(value: str) -> Run:
    run_id = services.run_id_or_none(value.strip())
    if run_id is None:
        raise CommandError(f"{value!r} is not a run id (a UUID, as `manage.py dex runs` lists)")
    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        raise CommandError(f"no run {run_id}")
    return run


def _limit(value: int) -> int:
    if not 1 <= value <= MAX_LIMIT:
        raise CommandError(f"--limit must be between 1 and {MAX_LIMIT}")
    return value


def _user(username: str | None) -> Any:
    if not username:
        return None
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f"no user {username!r} (--user names a Django user, for the audit log)")
    return user
