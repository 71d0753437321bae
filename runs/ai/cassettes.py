"""LLM cassettes: the model exchanges a real run made, written to a file and answered again in a test.

    manage.py dex cassette export RUN_ID -o tests/cassettes/triage.json

    def test_triage(db):
        run = run_task("triage-agent", {"question": "..."}, cassette="tests/cassettes/triage.json")

A cassette holds, in the order the run made them, every LLM exchange of the run and of its child runs: the
request as Dex recorded it on the step (`ctx.ai.infer`'s model, messages, tools and params; a Pydantic AI or
OpenAI Agents SDK model request in that framework's own JSON), the response, and its usage. Secrets are
redacted on the way in (runs.redact), on the step already and again on export.

While a cassette plays (`run_task(..., cassette=...)`), each LLM step that would call a provider takes the
next exchange instead: its request must equal the recorded one, or the step fails at once and `run_task`
raises `CassetteMismatch` with a unified diff of the two requests. No provider is called and the response
cache is neither read nor written, so a test sees exactly what the cassette says. `record="new"` sends a
request past the end of the cassette to the configured provider and appends the exchange to the file;
`record="all"` records every exchange afresh.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from runs.redact import redact
from runs.sdk import NonRetriableError

FORMAT = "dex-cassette"
VERSION = 1
RecordMode = Literal["none", "new", "all"]
RECORD_MODES: tuple[str, ...] = ("none", "new", "all")
USAGE_KEYS = ("model", "provider", "input_tokens", "output_tokens", "cost_usd")
DIFF_LINES = 80  # a diff longer than this is cut: the first differences are what a reader needs


class CassetteError(Exception):
    """A cassette file that can't be read or used."""


class CassetteMismatch(NonRetriableError, AssertionError):
    """A run asked for an exchange the cassette doesn't hold (at that position). The message has the diff.

    An AssertionError too, so a test that lets it escape fails (rather than errors) with the diff shown."""


@dataclass
class Exchange:
    """One LLM request and its answer, as a step records it and a cassette holds it."""

    api: str  # "chat" (ctx.ai.infer), "pydantic-ai", "openai-agents": how `request`/`response` read
    request: dict[str, Any]
    response: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)  # model, provider, input_tokens, output_tokens, cost_usd
    step: str = ""  # the step key in the run it came from (for messages; not matched)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "api": self.api,
            "request": self.request,
            "response": self.response,
            "usage": self.usage,
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> Exchange:
        if not isinstance(data, dict) or not isinstance(data.get("request"), dict) or not data.get("api"):
            raise CassetteError(f"{where}: an exchange needs 'api' and a 'request' object")
        if not isinstance(data.get("response"), dict):
            raise CassetteError(f"{where}: an exchange needs a 'response' object")
        return cls(
            api=str(data["api"]),
            request=data["request"],
            response=data["response"],
            usage=data.get("usage") or {},
            step=str(data.get("step") or ""),
        )


def redact_json(value: Any) -> Any:
    """`value` with every string passed through runs.redact (keys are kept: they are the format's)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(v) for v in value]
    return value


def canonical(value: Any) -> str:
    """The text two requests are compared by (and a diff is drawn from): sorted keys, indented."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, default=str)


def request_diff(recorded: Exchange, asked: Exchange) -> str:
    before = canonical({"api": recorded.api, **recorded.request}).splitlines()
    after = canonical({"api": asked.api, **asked.request}).splitlines()
    lines = list(difflib.unified_diff(before, after, "cassette", "this run", n=2, lineterm=""))
    if len(lines) > DIFF_LINES:
        lines = [*lines[:DIFF_LINES], f"... ({len(lines) - DIFF_LINES} more diff lines)"]
    return "\n".join(lines)


# --- files ------------------------------------------------------------------------------------------------


def load(path: str | Path) -> list[Exchange]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CassetteError(f"no cassette at {path} (export one with `manage.py dex cassette export`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CassetteError(f"cannot read the cassette {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("exchanges"), list):
        raise CassetteError(f"{path} is not a Dex cassette (format {FORMAT!r} with a list of exchanges)")
    if data.get("version") != VERSION:
        raise CassetteError(f"{path} is a version {data.get('version')} cassette; this Dex reads version {VERSION}")
    return [Exchange.from_dict(item, where=f"{path} exchange #{i + 1}") for i, item in enumerate(data["exchanges"])]


def dump(exchanges: list[Exchange], **header: Any) -> str:
    data = {
        "format": FORMAT,
        "version": VERSION,
        **header,
        "exchanges": [redact_json(exchange.to_dict()) for exchange in exchanges],
    }
    return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"


def save(path: str | Path, exchanges: list[Exchange], **header: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump(exchanges, **header))
    tmp.replace(path)  # never a half-written cassette


# --- export -----------------------------------------------------------------------------------------------


def export_run(run: Any) -> dict[str, Any]:
    """The cassette of `run` (a runs.models.Run) and its descendants: every completed LLM step that recorded
    its request, in the order they finished."""
    from runs.models import Run, Step, StepKind, StepStatus

    run_ids = [run.pk]
    frontier = [run.pk]
    while frontier:  # descendants, breadth first; a run tree is small
        frontier = list(Run.objects.filter(parent_id__in=frontier).values_list("pk", flat=True))
        run_ids.extend(frontier)
    steps = Step.objects.filter(run_id__in=run_ids, kind=StepKind.AI, status=StepStatus.COMPLETED).order_by(
        "finished_at", "seq"
    )
    exchanges, unrecorded = [], []
    for step in steps:
        exchange = (step.meta or {}).get("exchange")
        if not exchange:
            unrecorded.append(step.key)
            continue
        usage = (step.meta or {}).get("usage") or {}
        exchanges.append(
            Exchange(
                api=exchange["api"],
                request=exchange["request"],
                response=step.output if isinstance(step.output, dict) else {"value": step.output},
                usage={k: usage[k] for k in USAGE_KEYS if k in usage},
                step=step.key,
            )
        )
    header = {
        "run": str(run.pk),
        "task": run.task_id,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if unrecorded:
        header["unrecorded_steps"] = unrecorded  # made before Dex recorded requests: they can't be replayed
    return {"header": header, "exchanges": exchanges}


# --- playing ----------------------------------------------------------------------------------------------


class Player:
    """Answers LLM steps from a cassette, in order (see the module docstring)."""

    def __init__(self, path: str | Path, record: RecordMode = "none"):
        if record not in RECORD_MODES:
            raise ValueError(f"record must be one of {RECORD_MODES}, not {record!r}")
        self.path = Path(path)
        self.record = record
        if record == "all":
            self.exchanges: list[Exchange] = []
        elif record == "new" and not self.path.exists():
            self.exchanges = []
        else:
            self.exchanges = load(self.path)
        self.position = 0
        self.recorded = 0  # exchanges appended by this player
        self.mismatch: CassetteMismatch | None = None
        self._lock = threading.Lock()

    def take(self, asked: Exchange) -> Exchange | None:
        """The recorded answer to `asked`; None when it must go to the provider (and be recorded)."""
        with self._lock:
            n = self.position + 1
            if self.position < len(self.exchanges):
                recorded = self.exchanges[self.position]
                if recorded.api == asked.api and _same(recorded.request, asked.request):
                    self.position += 1
                    return recorded
                self._fail(
                    f"LLM request #{n} (step {asked.step!r}) is not the one the cassette {self.path} holds at "
                    f"that position (recorded by step {recorded.step!r}):\n{request_diff(recorded, asked)}"
                )
            if self.record in ("new", "all"):
                return None
            self._fail(
                f"LLM request #{n} (step {asked.step!r}) is past the end of the cassette {self.path}, which holds "
                f"{len(self.exchanges)} exchange(s); record it with run_task(..., record='new'). The request:\n"
                + canonical({"api": asked.api, **asked.request})[:4000]
            )

    def add(self, exchange: Exchange) -> None:
        """Append an exchange answered by the provider (record modes only)."""
        with self._lock:
            self.exchanges.append(exchange)
            self.position += 1
            self.recorded += 1

    def _fail(self, message: str) -> None:
        self.mismatch = self.mismatch or CassetteMismatch(message)
        raise CassetteMismatch(message)

    def save_if_recorded(self) -> None:
        if self.recorded:
            save(self.path, self.exchanges, recorded_by="runs.testing.run_task")


def _same(recorded: dict[str, Any], asked: dict[str, Any]) -> bool:
    # The recorded request was redacted on its way to the step and the file; compare like with like.
    return canonical(recorded) == canonical(redact_json(asked))


_player: contextvars.ContextVar[Player | None] = contextvars.ContextVar("dex_cassette", default=None)


def current_player() -> Player | None:
    return _player.get()


@contextmanager
def playing(player: Player) -> Iterator[Player]:
    token = _player.set(player)
    try:
        yield player
    finally:
        _player.reset(token)
