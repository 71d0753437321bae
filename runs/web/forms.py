"""Dashboard forms: the trigger form built from a task's payload model, and the forms of the events,
schedules and API keys pages.

The trigger form is a convenience over the payload model, not a second validator: Django fields parse what a
browser can send (numbers, checkboxes, choices, JSON text), then the task's pydantic model decides, and its
errors are put back on the fields they name (`payload_errors_to_form`).
"""

from __future__ import annotations

import enum
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

import pydantic
from django import forms
from django.core.validators import RegexValidator
from pydantic_core import PydanticUndefined

from runs.engine.create import MAX_DELAY_SECONDS
from runs.models import ApiKeyScope, Schedule, apikey_all_scopes
from runs.sdk.registry import registry
from runs.text import describe, find_unstorable

# Field-name prefix of the payload fields, so a payload field called `tags` or `delay` can't collide with the
# run options of the same form.
PAYLOAD_PREFIX = "payload"
OPTIONS_PREFIX = "run"

_SCALARS: dict[type, type[forms.Field]] = {str: forms.CharField, int: forms.IntegerField, float: forms.FloatField}

# A text field without a max_length of its own still has one: a form field is no way to send megabytes (the API
# is), and a huge one must be a form error, not a failed request.
TEXT_MAX_CHARS = 100_000
# A text field gets a multi-line box when its type says so (`json_schema_extra={"format": "textarea"}`), when it
# may be longer than this, or when its name says it holds prose or code.
TEXTAREA_MIN_MAX_LENGTH = 300
TEXTAREA_NAMES = frozenset({"diff", "patch", "text", "message", "body", "prompt", "content", "code", "document"})


@dataclass
class Constraints:
    """What `Annotated[...]` / `Field(...)` say about a value: bounds, lengths, a pattern, a multiple."""

    ge: Any = None
    gt: Any = None
    le: Any = None
    lt: Any = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    multiple_of: Any = None

    @classmethod
    def of(cls, info: pydantic.fields.FieldInfo) -> Constraints:
        found = cls()
        for item in info.metadata:
            for name in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern", "multiple_of"):
                value = getattr(item, name, None)
                if value is not None:
                    setattr(found, name, value)
        return found

    def describe(self) -> str:
        parts = []
        if self.ge is not None:
            parts.append(f"≥ {self.ge}")
        if self.gt is not None:
            parts.append(f"> {self.gt}")
        if self.le is not None:
            parts.append(f"≤ {self.le}")
        if self.lt is not None:
            parts.append(f"< {self.lt}")
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        if self.min_length is not None and self.max_length is not None:
            parts.append(f"{self.min_length}–{self.max_length} characters")
        elif self.min_length is not None:
            parts.append(f"at least {self.min_length} characters")
        elif self.max_length is not None:
            parts.append(f"at most {self.max_length} characters")
        if self.pattern:
            parts.append(f"matching {self.pattern}")
        return ", ".join(parts)


def _is_textarea(name: str, info: pydantic.fields.FieldInfo, max_length: int) -> bool:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if extra.get("format") in ("textarea", "multiline") or extra.get("multiline"):
        return True
    return max_length > TEXTAREA_MIN_MAX_LENGTH or name.lower() in TEXTAREA_NAMES


def _scalar_field(
    name: str, annotation: type, info: pydantic.fields.FieldInfo, common: dict[str, Any], default: Any
) -> forms.Field:
    """A text or number field with the constraints of its type: checked here first (a form error on the field
    and a hint beside it), and again by the payload model, whose errors land on the same field."""
    limits = Constraints.of(info)
    hint = limits.describe()
    if info.examples:
        hint = "; ".join(filter(None, [hint, "e.g. " + ", ".join(str(e) for e in info.examples[:3])]))
    if hint:
        common = {**common, "help_text": "; ".join(filter(None, [common["help_text"], hint]))}
    if annotation is str:
        max_length = min(limits.max_length or TEXT_MAX_CHARS, TEXT_MAX_CHARS)
        validators = [RegexValidator(limits.pattern, f"Must match {limits.pattern}.")] if limits.pattern else []
        # A required text field must say something; whitespace alone is empty (Django strips it).
        field = TextField(
            **common, initial=default, max_length=max_length, min_length=limits.min_length, validators=validators
        )
        if _is_textarea(name, info, max_length):
            field.widget = forms.Textarea(
                attrs={"rows": 10, "spellcheck": "false", **field.widget_attrs(forms.Textarea())}
            )
        return field
    kwargs: dict[str, Any] = {"initial": default}
    minimum = limits.ge if limits.ge is not None else limits.gt
    maximum = limits.le if limits.le is not None else limits.lt
    if annotation is int:
        # For integers a strict bound is the next integer inward: "> 0" is "≥ 1".
        if limits.gt is not None and limits.ge is None:
            minimum = int(limits.gt) + 1
        if limits.lt is not None and limits.le is None:
            maximum = int(limits.lt) - 1
        kwargs.update(min_value=minimum, max_value=maximum)
    else:
        # A strict float bound is checked by the model; the field only refuses what is outside the closed one.
        kwargs.update(min_value=minimum, max_value=maximum)
    if limits.multiple_of is not None:
        kwargs["step_size"] = limits.multiple_of
    return _SCALARS[annotation](**common, **kwargs)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without `None`, whether None was allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007
    return annotation, False


class JSONTextField(forms.JSONField):
    """A JSON value in a textarea; an empty box is "not given" (None), not an error."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("widget", forms.Textarea(attrs={"rows": 4, "class": "mono", "spellcheck": "false"}))
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if value is None:
            return ""
        text = super().prepare_value(value)
        try:
            text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (from a "\ud800" escape) can't be written into a UTF-8 page: echo it escaped.
            return json.dumps(value, ensure_ascii=True, cls=self.encoder)
        return text

    def validate(self, value: Any) -> None:
        super().validate(value)
        # "\u0000" and lone surrogates parse as JSON but Postgres's jsonb can't store them (issue 12).
        found = find_unstorable(value)
        if found:
            raise forms.ValidationError(describe(found))


class TextField(forms.CharField):
    """Text as typed: a browser sends a textarea's line breaks as CRLF, which a diff or a prompt must not get."""

    def to_python(self, value: Any) -> str:
        text = super().to_python(value)
        return text.replace("\r\n", "\n") if isinstance(text, str) else text


class LinesField(forms.CharField):
    """A list of scalars, one per line: the browser sends text, the payload model converts each item."""

    widget = forms.Textarea(attrs={"rows": 3})

    def to_python(self, value: Any) -> list[str] | None:  # type: ignore[override]
        text = super().to_python(value)
        if not text:
            return None
        return [line.strip() for line in text.splitlines() if line.strip()]


def _form_field(name: str, info: pydantic.fields.FieldInfo) -> forms.Field:
    annotation, nullable = _unwrap_optional(info.annotation)
    has_default = info.default is not PydanticUndefined or info.default_factory is not None
    default = info.get_default(call_default_factory=True) if has_default else None
    required = not has_default and not nullable
    common: dict[str, Any] = {"label": name, "required": required, "help_text": info.description or ""}
    origin = typing.get_origin(annotation)

    if annotation is bool:
        # An unticked checkbox sends nothing: that is False, so the field is never "required".
        return forms.BooleanField(**{**common, "required": False}, initial=bool(default))
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        choices = [(json.dumps(v) if not isinstance(v, str) else v, str(v)) for v in values]
        return forms.ChoiceField(
            **common, choices=([("", "—")] if not required else []) + choices, initial=_choice_initial(default)
        )
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [(str(member.value), f"{member.name} ({member.value})") for member in annotation]
        initial = str(default.value) if isinstance(default, enum.Enum) else default
        return forms.ChoiceField(**common, choices=([("", "—")] if not required else []) + choices, initial=initial)
    if annotation in _SCALARS:
        return _scalar_field(name, annotation, info, common, default)
    if origin in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if args and all(a in _SCALARS for a in args):
            initial = "\n".join(str(v) for v in default) if default else None
            return LinesField(**{**common, "help_text": common["help_text"] or "One item per line."}, initial=initial)
    # Nested models, dicts, unions, Any...: JSON, validated by the model.
    initial = _jsonable(default) if has_default and default is not None else None  # the field dumps it
    return JSONTextField(**{**common, "help_text": common["help_text"] or "JSON."}, initial=initial)


def _choice_initial(default: Any) -> Any:
    return default if isinstance(default, str) or default is None else json.dumps(default)


def _jsonable(value: Any) -> Any:
    try:
        return pydantic.TypeAdapter(type(value)).dump_python(value, mode="json")
    except Exception:  # an initial value is a convenience: an odd default must not break the form
        return str(value)


class PayloadForm(forms.Form):
    """The fields of a payload model, one Django field per model field (see the module docstring)."""

    def __init__(self, *args: Any, model: type[pydantic.BaseModel], **kwargs: Any) -> None:
        kwargs.setdefault("prefix", PAYLOAD_PREFIX)
        super().__init__(*args, **kwargs)
        self.model = model
        self.literal_fields: dict[str, dict[str, Any]] = {}
        for name, info in model.model_fields.items():
            self.fields[name] = _form_field(name, info)
            annotation, _ = _unwrap_optional(info.annotation)
            if typing.get_origin(annotation) is typing.Literal:
                # Choices travel as text; map each back to its typed value (Literal[1, 2] must stay ints).
                self.literal_fields[name] = {
                    (v if isinstance(v, str) else json.dumps(v)): v for v in typing.get_args(annotation)
                }

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        for name, value in list(cleaned.items()):
            # Postgres can't store a NUL in text or JSON: refused here, on its field, not by the database.
            if _has_nul(value):
                self.add_error(name, "Null characters are not allowed.")
        if self.errors:
            # Some fields failed their own checks, so the view won't ask the model: ask it here about the others,
            # so that every error shows at once rather than one round trip each.
            try:
                self.model.model_validate(self._payload_of(self.cleaned_data))
            except pydantic.ValidationError as exc:
                payload_errors_to_form(self, exc)
        return self.cleaned_data

    def payload(self) -> dict[str, Any]:
        """The payload for the model: fields left empty are left out, so the model's defaults apply."""
        return self._payload_of(self.cleaned_data)

    def _payload_of(self, cleaned: dict[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name, value in cleaned.items():
            if name in self.literal_fields:
                if value in ("", None):
                    continue
                value = self.literal_fields[name].get(value, value)
            elif value is None or value == "":
                continue
            data[name] = value
        return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


class TriggerOptionsForm(forms.Form):
    idempotency_key = forms.CharField(
        required=False, max_length=255, help_text="A second trigger with the same key returns the first run."
    )
    tags = forms.CharField(required=False, max_length=500, help_text="Comma-separated.")
    delay = forms.FloatField(
        required=False, min_value=0, max_value=MAX_DELAY_SECONDS, help_text="Seconds before the run starts."
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prefix", OPTIONS_PREFIX)
        super().__init__(*args, **kwargs)

    def clean_tags(self) -> list[str]:
        return [tag.strip() for tag in self.cleaned_data["tags"].split(",") if tag.strip()]


def payload_errors_to_form(form: forms.Form, exc: pydantic.ValidationError) -> None:
    """Put each pydantic error on the form field its location starts with (else on the form itself); a field
    that already has an error keeps that one (the model only misses the value the field refused)."""
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        message = error["msg"]
        if loc and loc[0] in form.errors:
            continue
        if loc and loc[0] in form.fields:
            if len(loc) > 1:
                message = f"{'.'.join(loc[1:])}: {message}"
            form.add_error(loc[0], message)
        else:
            form.add_error(None, f"{'.'.join(loc) or 'payload'}: {message}")


def _json_object(value: Any) -> dict:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise forms.ValidationError('Must be a JSON object, e.g. {"key": "value"}.')
    return value


class EventSendForm(forms.Form):
    name = forms.CharField(max_length=200, help_text="e.g. report.reviewed")
    data = JSONTextField(required=False, initial={}, help_text="A JSON object; waits match on its keys.")
    id = forms.CharField(
        required=False, max_length=255, label="Id", help_text="Optional: an event id already received is ignored."
    )

    def clean_data(self) -> Any:
        value = self.cleaned_data.get("data")
        return {} if value is None else value


class ScheduleForm(forms.Form):
    task_id = forms.ChoiceField(label="Task")
    cron = forms.CharField(max_length=100, help_text="minute hour day-of-month month day-of-week, e.g. */5 * * * *")
    timezone = forms.CharField(max_length=64, initial="UTC", help_text="An IANA time zone, e.g. Europe/Paris.")
    payload = JSONTextField(required=False, initial={}, help_text="A JSON object, validated by the task.")
    enabled = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args: Any, schedule: Schedule | None = None, **kwargs: Any) -> None:
        if schedule is not None:
            kwargs.setdefault(
                "initial",
                {
                    "task_id": schedule.task_id,
                    "cron": schedule.cron,
                    "timezone": schedule.timezone,
                    "payload": schedule.payload,
                    "enabled": schedule.enabled,
                },
            )
        super().__init__(*args, **kwargs)
        self.fields["task_id"].choices = [(t.id, t.id) for t in registry.all()]
        if schedule is not None:
            # A schedule's task is what it is; edit the rest (schedule_update can't move it to another task).
            self.fields["task_id"].disabled = True
            self.fields["task_id"].choices = [(schedule.task_id, schedule.task_id)]

    def clean_payload(self) -> dict:
        return _json_object(self.cleaned_data.get("payload"))


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Who or what uses it, e.g. ci-pipeline.")
    scopes = forms.MultipleChoiceField(
        choices=ApiKeyScope.choices,
        initial=apikey_all_scopes,
        widget=forms.CheckboxSelectMultiple,
        help_text="What the key may do; give it only what its client needs.",
        error_messages={"required": "Pick at least one scope."},
    )
    expires_in_days = forms.TypedChoiceField(
        label="Expires",
        choices=[
            ("", "Never"),
            ("1", "In 1 day"),
            ("7", "In 7 days"),
            ("30", "In 30 days"),
            ("90", "In 90 days"),
            ("365", "In a year"),
        ],
        coerce=int,
        empty_value=None,
        required=False,
        initial="90",
        help_text="After this the key is refused (401 key_expired).",
    )
