"""code-review-agent: lint the new side of a unified diff with ruff, then have an LLM review it.

The diff's files are rebuilt from their "+" side in a temporary directory (a new file whole; a modified file
as its hunks' context and added lines, placed at their line numbers), `ruff check` runs on them for real, and
only findings on lines the diff adds are kept. For a file the diff only shows in part, rules that need the
whole file (unused or undefined names, import order) are skipped: the rest of the file may well use or
define them.

ruff is a development tool, not one of Dex's runtime dependencies: `uv sync` installs it (the dev group).
Where it is missing, the lint step fails at once saying how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import Field

from runs.sdk import NonRetriableError, Retry, task

MODEL = "gpt-5-mini"
FALLBACKS = ["claude-haiku"]
RUFF_RULES = "E4,E7,E9,F,B,UP"
RUFF_TIMEOUT = 60
MAX_FINDINGS = 200
# Rules that can't be judged from a few hunks of a file.
WHOLE_FILE_RULES = frozenset({"F401", "F811", "F821", "F822", "F823", "F841", "E402", "I001"})
PYTHON_SUFFIXES = (".py", ".pyi")

_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


@dataclass
class NewFile:
    """The "+" side of one file of a diff: its known lines by number, and which of them the diff adds."""

    path: str
    whole: bool = False  # a new file: every line is known
    lines: dict[int, str] = field(default_factory=dict)
    added: set[int] = field(default_factory=set)
    hunks: list[int] = field(default_factory=list)  # the first new-side line of each hunk

    def text(self) -> str:
        """The file as far as the diff shows it, each known line at its number. A hunk that starts inside
        an indented block gets `if True:` openers in the unknown lines before it, so that it parses."""
        lines = dict(self.lines)
        if not self.whole:
            for start in self.hunks:
                first = next((lines[n] for n in range(start, start + 50) if lines.get(n, "").strip()), "")
                indent = first[: len(first) - len(first.lstrip())]
                unit = "\t" if indent.startswith("\t") else "    "
                levels = len(indent) // len(unit)
                gap = [n for n in range(start - levels, start) if n >= 1 and n not in lines]
                if levels and len(gap) == levels:
                    for depth, n in enumerate(gap):
                        lines[n] = unit * depth + "if True:"
        last = max(lines, default=0)
        return "".join(lines.get(n, "") + "\n" for n in range(1, last + 1))


def _diff_path(header: str) -> str | None:
    name = header.split("\t", 1)[0].strip()
    if name == "/dev/null":
        return None
    if name[:2] in ("a/", "b/"):
        name = name[2:]
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise NonRetriableError(f"the diff names an unsafe path: {name!r}")
    return str(path)


def parse_diff(diff: str) -> list[NewFile]:
    """The new side of every file a unified diff creates or changes (deleted files are left out)."""
    files: list[NewFile] = []
    current: NewFile | None = None
    old_is_null = False
    line_no = 0
    remaining = 0
    for raw in diff.splitlines():
        if remaining <= 0 and raw.startswith("--- "):
            old_is_null = raw[4:].split("\t", 1)[0].strip() == "/dev/null"
            continue
        if remaining <= 0 and raw.startswith("+++ "):
            path = _diff_path(raw[4:])
            current = NewFile(path=path, whole=old_is_null) if path else None
            if current is not None:
                files.append(current)
            continue
        match = _HUNK.match(raw)
        if match:
            line_no = int(match.group(1))
            remaining = int(match.group(2)) if match.group(2) is not None else 1
            if current is not None:
                current.hunks.append(line_no)
            continue
        if current is None or remaining <= 0:
            continue
        if raw.startswith("+"):
            current.lines[line_no] = raw[1:]
            current.added.add(line_no)
        elif raw.startswith(" ") or raw == "":
            current.lines[line_no] = raw[1:]
        else:
            continue  # "-" lines (the old side) and "\ No newline at end of file"
        line_no += 1
        remaining -= 1
    return files


def lint_diff(diff: str) -> dict:
    """Run ruff on the diff's new Python files; the findings on the lines it adds."""
    files = [f for f in parse_diff(diff) if f.path.endswith(PYTHON_SUFFIXES) and f.added]
    if not files:
        return {"files": [], "findings": []}
    if importlib.util.find_spec("ruff") is None:  # the same interpreter runs it: `python -m ruff`
        raise NonRetriableError(
            "code-review-agent lints with ruff, which is not installed in this environment: `uv sync` installs "
            "it (Dex's dev dependencies), or `pip install ruff`"
        )
    with tempfile.TemporaryDirectory(prefix="dex-review-") as tmp:
        root = Path(tmp)
        for f in files:
            target = root / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.text())
        command = [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--isolated",
            "--no-cache",
            "--select",
            RUFF_RULES,
            "--output-format",
            "json",
            "--exit-zero",
            *[f.path for f in files],
        ]
        try:
            done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=RUFF_TIMEOUT)
        except FileNotFoundError as exc:  # no interpreter: nothing a retry fixes
            raise NonRetriableError(f"cannot run ruff: {exc}") from exc
        if done.returncode != 0:
            raise RuntimeError(f"ruff exited with {done.returncode}: {done.stderr.strip()[:2000]}")
        try:
            reported = json.loads(done.stdout or "[]")
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"ruff's output isn't JSON: {done.stdout[:500]!r}") from exc
        by_path = {str((root / f.path).resolve()): f for f in files}
        findings = []
        for item in reported:
            f = by_path.get(str(Path(item.get("filename", "")).resolve()))
            row = (item.get("location") or {}).get("row")
            if f is None or row not in f.added:
                continue
            code = item.get("code") or "syntax-error"
            if not f.whole and code in WHOLE_FILE_RULES:
                continue
            findings.append(
                {
                    "file": f.path,
                    "line": row,
                    "column": (item.get("location") or {}).get("column"),
                    "code": code,
                    "message": item.get("message", ""),
                    "fixable": bool(item.get("fix")),
                }
            )
    findings.sort(key=lambda x: (x["file"], x["line"], x["column"] or 0, x["code"]))
    return {"files": [f.path for f in files], "findings": findings[:MAX_FINDINGS]}


def review_messages(diff: str, findings: list[dict]) -> list[dict]:
    if findings:
        listed = "\n".join(f"- {f['file']}:{f['line']}:{f['column']} {f['code']} {f['message']}" for f in findings)
    else:
        listed = "(none)"
    return [
        {
            "role": "system",
            "content": (
                "You are a careful code reviewer. Review the diff below for bugs, unclear code and missing tests. "
                "The static analysis findings were produced by ruff; explain the ones that matter. Start your "
                "answer with a line `VERDICT: approve` or `VERDICT: request_changes`.\n\n"
                f"Static analysis findings:\n{listed}"
            ),
        },
        {"role": "user", "content": diff[:60_000]},
    ]


def verdict_of(review: str, findings: list[dict]) -> str:
    """request_changes when ruff found anything or the reviewer asked for changes; approve otherwise."""
    asked = re.search(r"verdict\s*:\s*\**\s*(approve|request[_ ]changes)", review, re.I)
    if findings or (asked and asked.group(1).lower().startswith("request")):
        return "request_changes"
    return "approve"


@task("code-review-agent", retry=Retry(attempts=3, initial=2.0, max_delay=30), max_duration=timedelta(minutes=15))
def code_review_agent(
    ctx, diff: Annotated[str, Field(min_length=1, max_length=500_000, json_schema_extra={"format": "textarea"})]
) -> dict:
    """Reviews a unified diff (as `git diff` prints it): ruff lints the lines it adds, then an LLM reviews
    the change given ruff's findings. Returns the findings, the review and a verdict (approve or
    request_changes)."""
    ctx.set_metadata("progress", {"stage": "lint"})
    lint = ctx.step("lint", lint_diff, diff, retry=Retry(attempts=2, initial=1.0), timeout=RUFF_TIMEOUT + 30)
    findings = lint["findings"]
    ctx.log.info("ruff: %d finding(s) in %d file(s)", len(findings), len(lint["files"]))
    ctx.set_metadata("findings", len(findings))
    ctx.set_metadata("progress", {"stage": "review"})
    review = ctx.ai.infer("review", model=MODEL, fallbacks=FALLBACKS, messages=review_messages(diff, findings))
    verdict = verdict_of(review.text, findings)
    ctx.set_metadata("progress", {"stage": "done", "verdict": verdict})
    return {"findings": findings, "review": review.text, "verdict": verdict}
