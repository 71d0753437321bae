"""Manage API keys: `apikey create --name NAME [--scope read --scope trigger ...] [--expires-in 30d]`,
`apikey list`, `apikey revoke PREFIX_OR_ID`.

`create` prints the key once: only its SHA-256 is stored, so a lost key can't be shown again (revoke it and
create another).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs import services
from runs.models import ApiKey, ApiKeyScope
from runs.ops.audit import Actor
from runs.text import unstorable_option

SCOPES = [scope.value for scope in ApiKeyScope]
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class Command(BaseCommand):
    help = "Create, list and revoke API keys for the Dex HTTP API."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="{create,list,revoke}")
        create = actions.add_parser("create", help="Create a key and print it (once).")
        create.add_argument("--name", required=True, help="What the key is for, e.g. 'ci' or 'billing-service'.")
        create.add_argument(
            "--scope",
            action="append",
            dest="scopes",
            metavar="SCOPE",
            help=f"What the key may do ({', '.join(SCOPES)}); repeat, or separate with commas. Default: all.",
        )
        create.add_argument(
            "--expires-in",
            metavar="DURATION",
            help="Refuse the key after this long, e.g. 12h, 30d, 1w (s, m, h, d, w). Default: never.",
        )
        actions.add_parser("list", help="List keys (prefix, name, created, last used, revoked).")
        revoke = actions.add_parser("revoke", help="Revoke a key; requests with it fail from then on.")
        revoke.add_argument("key", metavar="PREFIX_OR_ID", help="The key's id, its prefix (as listed) or the key.")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        problem = unstorable_option(options)
        if problem:
            raise CommandError(problem)
        if action == "create":
            self.create_key(options["name"], options.get("scopes"), options.get("expires_in"))
        elif action == "list":
            self.list_keys()
        else:
            self.revoke_key(options["key"])

    def create_key(self, name: str, scope_args: list[str] | None = None, expires_in: str | None = None) -> None:
        name = name.strip()
        if not name:
            raise CommandError("--name must not be empty")
        if len(name) > ApiKey._meta.get_field("name").max_length:
            raise CommandError("--name is too long (at most 100 characters)")
        scopes = _scopes(scope_args)
        lifetime = _duration(expires_in) if expires_in is not None else None
        key, secret = services.apikey_create(name=name, scopes=scopes, expires_in=lifetime, by=Actor.cli())
        expiry = f", expires {key.expires_at:%Y-%m-%d %H:%M} UTC" if key.expires_at else ""
        # The key alone on stdout, so `KEY=$(manage.py apikey create --name ci)` works; the rest on stderr.
        self.stderr.write(
            f"Created API key {key.id} {key.name!r} (scopes: {', '.join(key.scopes)}{expiry}). "
            "It is shown only now; store it safely:"
        )
        self.stdout.write(secret)

    def list_keys(self) -> None:
        keys = ApiKey.objects.order_by("id")
        if not keys:
            self.stdout.write("No API keys. Create one with: manage.py apikey create --name NAME")
            return
        self.stdout.write(
            f"{'ID':>4}  {'PREFIX':<13} {'NAME':<24} {'SCOPES':<28} {'CREATED':<17} {'LAST USED':<17} "
            f"{'EXPIRES':<17} REVOKED"
        )
        for key in keys:
            self.stdout.write(
                f"{key.id:>4}  {key.prefix + '…':<13} {key.name[:24]:<24} {','.join(key.scopes):<28} "
                f"{_when(key.created_at):<17} {_when(key.last_used_at):<17} {_when(key.expires_at):<17} "
                f"{_when(key.revoked_at) if key.revoked_at else ''}"
            )

    def revoke_key(self, ref: str) -> None:
        key = _find(ref.strip().rstrip("…"))
        if services.apikey_revoke(key=key, by=Actor.cli()):
            self.stdout.write(f"Revoked API key {key.id} {key.name!r} ({key.prefix}…).")
        else:
            self.stdout.write(f"API key {key.id} {key.name!r} ({key.prefix}…) was already revoked.")


def _find(ref: str) -> ApiKey:
    if not ref:
        raise CommandError("give a key's id or prefix")
    if ref.isdigit():
        matches = list(ApiKey.objects.filter(pk=int(ref)))
    elif len(ref) > len(ApiKey.PREFIX) + 8:
        # Longer than a stored prefix: the whole key (only its hash can find it).
        matches = list(ApiKey.objects.filter(key_hash=ApiKey.hash(ref)))
    else:
        matches = list(ApiKey.objects.filter(prefix__startswith=ref))
    if not matches:
        raise CommandError(f"no API key matches {ref!r}; see `manage.py apikey list`")
    if len(matches) > 1:
        listed = ", ".join(f"{k.id} ({k.prefix}…)" for k in matches)
        raise CommandError(f"{ref!r} matches several keys: {listed}; give the id")
    return matches[0]


def _scopes(args: list[str] | None) -> list[str] | None:
    """The scopes named by repeated / comma-separated --scope options (None: every scope)."""
    if not args:
        return None
    scopes = list(dict.fromkeys(s.strip() for arg in args for s in arg.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise CommandError(f"unknown scope {', '.join(map(repr, unknown))}: choose from {', '.join(SCOPES)}")
    return scopes


def _duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip().lower())
    if not match or int(match[1]) == 0:
        raise CommandError(f"--expires-in reads like 12h, 30d or 1w (a positive number and s/m/h/d/w), not {text!r}")
    try:
        duration = timedelta(**{_UNITS[match[2]]: int(match[1])})
    except OverflowError:
        duration = timedelta.max
    if duration > timedelta(days=100 * 366):
        raise CommandError(f"--expires-in {text!r} is more than 100 years; leave it out for a key that never expires")
    return duration


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"
