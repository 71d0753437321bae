"""fan-out-summariser: summarise many documents in parallel, one child run each, then combine the summaries.

`ctx.map` starts a "summarise-document" child run per document (each its own retries, cost and page in the
dashboard), parks the parent until all have finished, and returns their outputs in the documents' order.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator, Field

from runs.sdk import NonRetriableError, Retry, task

MODEL = "gpt-5-mini"
FALLBACKS = ["claude-haiku"]
MAX_DOCUMENT_CHARS = 100_000
MAX_DOCUMENTS = 200


def _documents_bounded(documents: list[str]) -> list[str]:
    # Refused when the run is triggered (a 422, a form error), not when its child run gets the document.
    for i, document in enumerate(documents):
        if len(document) > MAX_DOCUMENT_CHARS:
            raise ValueError(f"document {i} has {len(document):,} characters; the limit is {MAX_DOCUMENT_CHARS:,}")
    return documents


@task("summarise-document", retry=Retry(attempts=4, initial=2.0, max_delay=60), max_duration=timedelta(minutes=10))
def summarise_document(ctx, document: Annotated[str, Field(max_length=MAX_DOCUMENT_CHARS)]) -> dict:
    """Summarises one document in a few sentences (the child task of fan-out-summariser)."""
    if len(document) > MAX_DOCUMENT_CHARS:
        raise NonRetriableError(f"the document has {len(document)} characters; the limit is {MAX_DOCUMENT_CHARS}")
    answer = ctx.ai.infer(
        "summarise",
        model=MODEL,
        fallbacks=FALLBACKS,
        messages=[
            {
                "role": "system",
                "content": "Summarise the user's document in at most three sentences. Keep names and numbers.",
            },
            {"role": "user", "content": document},
        ],
    )
    return {"summary": answer.text.strip(), "model": answer.model, "characters": len(document)}


def combine_messages(summaries: list[str]) -> list[dict]:
    numbered = "\n".join(f"{i}. {s}" for i, s in enumerate(summaries, start=1))
    return [
        {
            "role": "system",
            "content": (
                "You are given numbered summaries of several documents. Write one short overview of what they "
                "say together, noting where they agree or differ, and refer to documents by number."
            ),
        },
        {"role": "user", "content": numbered},
    ]


@task("fan-out-summariser", retry=Retry(attempts=3, initial=2.0, max_delay=30), max_duration=timedelta(minutes=30))
def fan_out_summariser(
    ctx,
    documents: Annotated[list[str], Field(max_length=MAX_DOCUMENTS), AfterValidator(_documents_bounded)],
) -> dict:
    """Summarises each document in its own child run (in parallel), then combines the summaries into one
    overview. Returns the summaries in the documents' order, and the overview."""
    if len(documents) > MAX_DOCUMENTS:
        raise NonRetriableError(f"{len(documents)} documents; at most {MAX_DOCUMENTS} per run")
    if not documents:
        return {"summaries": [], "overview": ""}
    ctx.set_metadata("progress", {"stage": "summarise", "documents": len(documents)})
    results = ctx.map("summarise", summarise_document, [{"document": d} for d in documents])
    summaries = [r["summary"] for r in results]
    ctx.set_metadata("progress", {"stage": "combine"})
    overview = ctx.ai.infer("combine", model=MODEL, fallbacks=FALLBACKS, messages=combine_messages(summaries))
    ctx.set_metadata("progress", {"stage": "done"})
    return {"summaries": summaries, "overview": overview.text.strip()}
