"""The audit log: every operator action (who, what, when, which runs), shown at /audit/."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from runs.models import AuditEntry, Run

OPERATE_PERMISSION = "runs.operate_runs"


def is_operator(user: Any) -> bool:
    """Operators act on runs (trigger, cancel, retry, replay, fork, approve); viewers only read."""
    return bool(user and user.is_authenticated and user.has_perm(OPERATE_PERMISSION))


def roles_ensure() -> None:
    """The two roles as groups: "viewer" (reads) and "operator" (runs.operate_runs). A migration creates
    them; this puts them back where they were deleted (a flushed test database, a careless admin)."""
    from django.contrib.auth.models import Group, Permission
    from django.contrib.contenttypes.models import ContentType

    permission, _ = Permission.objects.get_or_create(
        codename="operate_runs",
        content_type=ContentType.objects.get_for_model(Run),
        defaults={"name": "Can trigger, cancel, retry, replay and fork runs and answer approvals"},
    )
    Group.objects.get_or_create(name="viewer")
    operator, _ = Group.objects.get_or_create(name="operator")
    operator.permissions.add(permission)


def audit_record(*, user: Any, action: str, run_ids: Iterable[UUID | str] = (), **detail: Any) -> AuditEntry:
    """Record an operator action. `detail` holds what else matters (a filter, a payload edit, a count)."""
    authenticated = user is not None and getattr(user, "is_authenticated", False)
    return AuditEntry.objects.create(
        user=user if authenticated else None,
        username=user.get_username() if authenticated else "",
        action=action,
        run_ids=[UUID(str(r)) for r in run_ids],
        detail=detail,
    )
