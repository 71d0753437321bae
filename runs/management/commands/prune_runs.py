"""Delete finished runs older than an age, with their steps, logs, token chunks and stored outputs.

    manage.py prune_runs --older-than 30d [--status completed --status canceled] [--task T] [--dry-run]
                         [--batch-size 500]

Algorithm (runs.ops.retention.runs_prune):
1. pick up to --batch-size finished runs (completed/failed/canceled/timed_out, or the --status ones) whose
   finished_at is older than --older-than, oldest first, skipping runs another process holds and children
   whose parent is still unfinished;
2. delete them in one short transaction (steps, log lines, chunks, waitpoints and alerts cascade; runs that
   point at them as parent / replay keep their rows with the link cleared);
3. after the commit, delete their stored outputs; repeat until nothing is left; print the counts.
Queued, delayed, running and waiting runs are never deleted. With --dry-run, only count.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs.models import TERMINAL_STATUSES
from runs.ops import retention
from runs.ops.audit import Actor


class Command(BaseCommand):
    help = "Delete finished runs older than --older-than (e.g. 30d, 12h, 90m), with their steps, logs and outputs."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            required=True,
            help="Age of the runs to delete, by when they finished: 30d, 12h, 90m, 45s or 2w.",
        )
        parser.add_argument(
            "--status",
            action="append",
            choices=[str(s) for s in TERMINAL_STATUSES],
            help="Only runs that ended so (repeatable). Default: every finished status.",
        )
        parser.add_argument("--task", help="Only runs of this task id.")
        parser.add_argument("--dry-run", action="store_true", help="Count what would be deleted; delete nothing.")
        parser.add_argument("--batch-size", type=int, default=500, help="Runs deleted per transaction (500).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            older_than = retention.parse_duration(options["older_than"])
        except retention.BadDuration as exc:
            raise CommandError(f"--older-than: {exc}") from None
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        result = retention.runs_prune(
            older_than=older_than,
            statuses=options["status"],
            task=options["task"],
            batch_size=options["batch_size"],
            dry_run=options["dry_run"],
            by=Actor.cli(),
        )
        counts = retention.describe(result)
        if options["dry_run"]:
            counts.pop("stored outputs")
            self.stdout.write("Dry run: nothing deleted. Would delete " + _counts(counts) + ".")
        else:
            self.stdout.write(self.style.SUCCESS("Deleted " + _counts(counts) + f" in {result.batches} batch(es)."))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {_label(name)}" for name, n in counts.items())


def _label(name: str) -> str:
    # "runs.Step" → "steps", "runs.LogLine" → "log lines"; other apps' models keep their label.
    return {
        "runs": "runs",
        "runs.Step": "steps",
        "runs.LogLine": "log lines",
        "runs.StepChunk": "token chunks",
        "runs.Waitpoint": "waitpoints",
    }.get(name, name)
