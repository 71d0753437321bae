"""Large outputs live in Django's storage API (the "dex_outputs" storage in settings.STORAGES), not in the row.

A step's (or run's) output whose JSON is over DEX_OUTPUT_INLINE_MAX_BYTES is written to the storage *before*
the engine's fenced write commits the row, and the row keeps a small reference instead of the value:

    {"$dex_blob": "<run id>/<sha256>.json", "size": <bytes>, "sha256": "<hex>"}

Keys are content-addressed inside their run's prefix, so writing the same output again (a retried step, a
second worker that lost its lease) writes the same key and changes nothing. A blob whose row never committed
is an orphan until its run is pruned: runs.ops.retention deletes a pruned run's whole `<run id>/` prefix.

Reads are transparent: `OutputField` (Step.output, Run.output) loads the blob when a row is read, so the
engine's replay, the API, the pages and the downloads all see the value itself. Outputs under the limit never
touch the storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import models
from django.db.models.fields.json import KeyTransform

STORAGE_ALIAS = "dex_outputs"
BLOB_KEY = "$dex_blob"
# A user's value that merely contains the marker key is always offloaded, so an inline row holding the marker
# is never ambiguous: every row output with the marker is a reference written by this module.
_MARKER_TEXT = f'"{BLOB_KEY}"'


class OutputStorageError(Exception):
    """The output storage could not be written or read (unreachable, missing or corrupt blob)."""


def output_storage() -> Storage:
    return storages[STORAGE_ALIAS]


def is_reference(value: Any) -> bool:
    return type(value) is dict and BLOB_KEY in value


def _needs_offload(text: str) -> bool:
    limit = settings.DEX_OUTPUT_INLINE_MAX_BYTES
    # UTF-8 takes at most 4 bytes a character: most outputs are decided without encoding them.
    if len(text) * 4 <= limit:
        return _MARKER_TEXT in text
    return len(text.encode()) > limit or _MARKER_TEXT in text


def blob_prefix(run_id: UUID | str) -> str:
    return str(run_id)


def offload_text(text: str, *, run_id: UUID | str) -> str:
    """The JSON text to store in the row for an output whose JSON is `text`: `text` itself when it is small,
    else a reference to a blob written (now, before the row's commit) under the run's prefix.
    OutputStorageError if the storage can't be written."""
    if not _needs_offload(text):
        return text
    data = text.encode()
    digest = hashlib.sha256(data).hexdigest()
    key = f"{blob_prefix(run_id)}/{digest}.json"
    storage = output_storage()
    try:
        if not storage.exists(key):
            saved = storage.save(key, ContentFile(data))
            if saved != key:
                # Another writer stored the same key between exists() and save(): the content is the same
                # by construction, so keep theirs and drop the renamed copy.
                storage.delete(saved)
    except Exception as exc:
        raise OutputStorageError(
            f"could not write a {len(data):,}-byte output to the {STORAGE_ALIAS!r} storage: {exc}"
        ) from exc
    return json.dumps({BLOB_KEY: key, "size": len(data), "sha256": digest})


def load(reference: dict) -> Any:
    """The value a reference stands for, read from the storage and checked against its sha256."""
    key = reference[BLOB_KEY]
    try:
        with output_storage().open(key, "rb") as blob:
            data = blob.read()
    except Exception as exc:
        raise OutputStorageError(
            f"the stored output {key!r} can't be read from the {STORAGE_ALIAS!r} storage: {exc}"
        ) from exc
    if hashlib.sha256(data).hexdigest() != reference.get("sha256"):
        raise OutputStorageError(f"the stored output {key!r} does not match its sha256: it was changed or truncated")
    return json.loads(data)


def delete_run_blobs(run_ids: list[UUID | str]) -> int:
    """Delete every blob under these runs' prefixes (their referenced outputs and any orphans); the count."""
    storage = output_storage()
    deleted = 0
    for run_id in run_ids:
        prefix = blob_prefix(run_id)
        try:
            _dirs, files = storage.listdir(prefix)
        except FileNotFoundError:
            continue  # the run never offloaded anything
        for name in files:
            storage.delete(f"{prefix}/{name}")
            deleted += 1
        if files or _dirs:
            with contextlib.suppress(OSError):
                storage.delete(prefix)  # the filesystem's now-empty directory (a no-op on object stores)
    return deleted


class OutputField(models.JSONField):
    """A JSONField whose large values live in the output storage (see the module docstring).

    Reading a row loads a referenced value. Saving through the ORM (a fork copying steps, an edited output)
    offloads a large value under the prefix of the run named by the instance's `run_attname`; the engine,
    which writes with its own SQL, calls `offload_text` itself."""

    def __init__(self, *args: Any, run_attname: str = "run_id", **kwargs: Any) -> None:
        self.run_attname = run_attname
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> tuple[Any, ...]:
        name, path, args, kwargs = super().deconstruct()
        if self.run_attname != "run_id":
            kwargs["run_attname"] = self.run_attname
        return name, path, args, kwargs

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        value = super().from_db_value(value, expression, connection)
        if is_reference(value) and not isinstance(expression, KeyTransform):
            return load(value)
        return value

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        value = super().pre_save(model_instance, add)
        if value is None:
            return value
        text = json.dumps(value, cls=self.encoder, ensure_ascii=False)
        stored = offload_text(text, run_id=getattr(model_instance, self.run_attname))
        return value if stored is text else json.loads(stored)
