"""The audit log: every operator action (who, what, when, which runs), shown at /audit/.

Services write the entries (runs.services, runs.ops.schedules), in the same transaction as the change, so an
action is audited whichever door it came through: the dashboard, the API, the admin or the CLI. The adapter
says who acts with an `Actor`.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from runs.models import ApiKey, AuditEntry, Run

OPERATE_PERMISSION = "runs.operate_runs"


def is_operator(user: Any) -> bool:
    """Operators act on runs (trigger, cancel, retry, replay, fork, approve); viewers only read."""
    return bool(user and user.is_authenticated and user.has_perm(OPERATE_PERMISSION))


@dataclass(frozen=True)
class Actor:
    """Who performs an action, and through which door (`via`: dashboard, admin, api, cli, system)."""

    via: str
    user: Any = None  # an authenticated user, or None
    api_key: ApiKey | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def web(cls, user: Any, *, via: str = "dashboard") -> Actor:
        return cls(via=via, user=user if getattr(user, "is_authenticated", False) else None)

    @classmethod
    def api(cls, key: ApiKey | None) -> Actor:
        return cls(via="api", api_key=key)

    @classmethod
    def cli(cls, user: Any = None) -> Actor:
        """A management command, on behalf of `user` (its --user) if given; the OS account is recorded too."""
        try:
            os_user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (a container)
            os_user = ""
        return cls(via="cli", user=user, detail={"os_user": os_user})

    @classmethod
    def system(cls, what: str) -> Actor:
        return cls(via="system", detail={"system": what})

    @property
    def username(self) -> str:
        """The name shown in the audit log and recorded on an approval."""
        if self.user is not None:
            return self.user.get_username()
        if self.api_key is not None:
            return f"api-key:{self.api_key.name}"
        return ""


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


def audit_record(*, by: Actor, action: str, run_ids: Iterable[UUID | str] = (), **detail: Any) -> AuditEntry:
    """Record an action. `detail` holds what else matters (a filter, a payload edit, a count)."""
    extra: dict[str, Any] = {"via": by.via, **by.detail}
    if by.api_key is not None:
        extra["api_key"] = by.api_key.prefix
    return AuditEntry.objects.create(
        user=by.user,
        username=by.username,
        action=action,
        run_ids=[UUID(str(r)) for r in run_ids],
        detail={**detail, **extra},
    )
