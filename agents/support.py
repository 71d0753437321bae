"""support-agent: classify a customer's message, draft a reply with an LLM, and send it only once a person
has approved it (editing it if they like) in the dashboard or through the API."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from django import forms
from pydantic import Field

from runs.sdk import Retry, task

MODEL = "gpt-5-mini"
FALLBACKS = ["claude-haiku"]
CATEGORIES = {
    "billing": ("charge", "charged", "invoice", "refund", "payment", "bill", "billing", "price", "subscription"),
    "technical": ("error", "bug", "crash", "broken", "doesn't work", "not working", "fails", "failed", "slow"),
    "account": ("password", "login", "log in", "sign in", "account", "email address", "2fa", "locked"),
    "shipping": ("delivery", "shipping", "shipped", "parcel", "package", "tracking", "arrive", "arrived"),
    "general": (),
}


class SendReplyForm(forms.Form):
    """What the approver may change before the reply goes out."""

    reply = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 8}),
        required=False,
        max_length=5000,
        help_text="Edit the reply to send; leave it empty to send the draft as it is.",
    )


def classify_messages(message: str) -> list[dict]:
    return [
        {
            "role": "system",
            "content": (
                "Classify the customer's message into exactly one category: "
                + ", ".join(CATEGORIES)
                + ". Answer with the category name only."
            ),
        },
        {"role": "user", "content": message},
    ]


def parse_category(answer: str, message: str) -> str:
    """The category the model named; when it named none (or several, first wins), the message's keywords."""
    words = re.findall(r"[a-z]+", answer.lower())
    named = [w for w in words if w in CATEGORIES]
    if named:
        return named[0]
    lowered = message.lower()
    for category, hints in CATEGORIES.items():
        if any(re.search(rf"\b{re.escape(hint)}\b", lowered) for hint in hints):
            return category
    return "general"


def draft_messages(customer: str, message: str, category: str) -> list[dict]:
    return [
        {
            "role": "system",
            "content": (
                f"You are a friendly, concise customer support agent. The customer is {customer}; their message "
                f"was classified as {category}. Write the reply to send them: acknowledge the problem, say what "
                "happens next, and don't promise what you can't know. Plain text, no more than 150 words."
            ),
        },
        {"role": "user", "content": message},
    ]


def send_reply(customer: str, reply: str, category: str) -> dict:
    """'Send' the reply: this example records it as the step's output (and in the step's log)."""
    import logging

    logging.getLogger("agents.support").info("sending reply to %s (%d characters)", customer, len(reply))
    return {"to": customer, "reply": reply, "category": category, "sent_at": datetime.now(UTC).isoformat()}


@task("support-agent", retry=Retry(attempts=3, initial=2.0, max_delay=30), max_duration=timedelta(days=7))
def support_agent(
    ctx,
    customer: Annotated[str, Field(min_length=1, max_length=200)],
    message: Annotated[str, Field(max_length=10_000)],
) -> dict:
    """Answers a support message: classifies it, drafts a reply with an LLM, waits for a person to approve
    (and possibly edit) the reply, then sends it. A rejected reply is not sent."""
    ctx.set_metadata("progress", {"stage": "classify"})
    answer = ctx.ai.infer("classify", model=MODEL, fallbacks=FALLBACKS, messages=classify_messages(message))
    category = parse_category(answer.text, message)
    ctx.set_metadata("category", category)

    ctx.set_metadata("progress", {"stage": "draft"})
    draft = ctx.ai.infer(
        "draft", model=MODEL, fallbacks=FALLBACKS, messages=draft_messages(customer, message, category), stream=True
    ).text.strip()

    ctx.set_metadata("progress", {"stage": "awaiting approval"})
    decision = ctx.wait_for_approval(
        "send-reply",
        prompt=f"Send this {category} reply to {customer}?\n\nThey wrote:\n{message}\n\nDraft reply:\n{draft}",
        form=SendReplyForm,
    )
    if not decision or not decision["approved"]:
        ctx.set_metadata("progress", {"stage": "rejected"})
        return {
            "status": "rejected",
            "category": category,
            "draft": draft,
            "by": (decision or {}).get("by", ""),
            "comment": (decision or {}).get("comment", ""),
        }
    reply = ((decision.get("data") or {}).get("reply") or "").strip() or draft
    sent = ctx.step("send", send_reply, customer, reply, category)
    ctx.set_metadata("progress", {"stage": "sent"})
    return {
        "status": "sent",
        "category": category,
        "reply": sent["reply"],
        "edited": reply != draft,
        "approved_by": decision.get("by", ""),
    }
