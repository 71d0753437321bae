"""The run list's filters as a form: parsed from the query string of `/` (and of `/ws/runs/`, and the hidden
fields of a bulk action "by filter"), so one link, one socket and one bulk action see the same runs."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from urllib.parse import urlencode

from django import forms
from django.http import QueryDict
from django.utils import timezone

from runs.models import RunStatus
from runs.selectors import RunListFilters

FILTER_FIELDS = ("status", "task", "tag", "version", "created_after", "created_before", "q")


class RunFilterForm(forms.Form):
    status = forms.MultipleChoiceField(choices=RunStatus.choices, required=False, widget=forms.CheckboxSelectMultiple)
    task = forms.CharField(required=False, max_length=200)
    tag = forms.CharField(required=False, max_length=100)
    version = forms.CharField(required=False, max_length=100, label="Code version")
    created_after = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    created_before = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    q = forms.CharField(required=False, max_length=255, label="Run id or idempotency key")

    def filters(self) -> RunListFilters:
        """The filters this form asks for; fields that didn't validate are ignored (a bookmarked URL with a
        bad date still shows the list)."""
        if not self.is_bound:
            return RunListFilters(top_level=True)
        self.is_valid()  # a field that doesn't validate is left out of cleaned_data
        data = self.cleaned_data
        after, before = data.get("created_after"), data.get("created_before")
        return RunListFilters(
            statuses=tuple(data.get("status") or ()),
            task_id=(data.get("task") or "").strip(),
            tag=(data.get("tag") or "").strip(),
            version=(data.get("version") or "").strip(),
            # Dates are whole days in the current time zone; "to" includes its day.
            created_after=_start_of(after) if after else None,
            # (9999-12-31 has no next day: "to" the last date is no bound.)
            created_before=_start_of(before + timedelta(days=1)) if before and before < date.max else None,
            search=(data.get("q") or "").strip(),
            # Child runs show under their parent; a search for one, or its task, finds it on its own.
            top_level=not (data.get("q") or "").strip() and not (data.get("task") or "").strip(),
        )


def filter_querystring(data: QueryDict) -> str:
    """The filter part of a query string (no cursor): for links to other pages and the socket's URL."""
    pairs = [(key, value) for key in FILTER_FIELDS for value in data.getlist(key) if value]
    return urlencode(pairs)


def _start_of(day: object) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))  # type: ignore[arg-type]
