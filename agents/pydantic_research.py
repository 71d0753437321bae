"""pydantic-research-agent: a Pydantic AI agent with two tools, made durable by wrapping it in `DexAgent`.

The agent answers a question about Python from the language reference bundled with the interpreter (the
research-agent's offline corpus): `search_reference` ranks its passages (BM25), `read_topic` reads one topic.
Each model request and each tool call is a step of the run: kill the worker mid-answer and the run resumes
without asking the model again or repeating a tool; fork it from any model call to try another path.

Runs offline against the local LLM server (`manage.py dev` starts one), which calls each tool once and then
gives the structured answer, and for real with an API key ("gpt-5-mini"). Needs the `pydantic-ai` extra
(installed by `uv sync`); without it the task fails saying so.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from dex_agents.research import corpus
from pydantic import BaseModel, Field

from runs.integrations import missing_extra
from runs.sdk import NonRetriableError, Retry, task

MODEL = "gpt-5-mini"
TOPIC_CHARS = 1500
INSTRUCTIONS = (
    "You answer questions about the Python language from its reference documentation, and only from it. "
    "Search the reference, read the most relevant topic, then answer briefly, naming the topics you used."
)


class Answer(BaseModel):
    """The agent's structured output."""

    answer: str = Field(description="A short answer to the question.")
    topics: list[str] = Field(description="The reference topics the answer is based on.")


def search_reference(query: str) -> list[dict]:
    """Search the Python language reference; returns the best passages, each with its topic name."""
    return [{"topic": hit["topic"], "passage": hit["passage"]} for hit in corpus().search(query)]


def read_topic(topic: str) -> dict:
    """Read one topic of the Python language reference (what `help(topic)` shows), e.g. "lambda" or
    "exceptions". An unknown name reads the topic that matches it best."""
    from pydoc_data.topics import topics

    if topic not in topics:
        hits = corpus().search(topic, limit=1)
        if not hits:
            return {"topic": topic, "error": f"no topic matches {topic!r}"}
        topic = hits[0]["topic"]
    text = topics[topic]
    return {"topic": topic, "text": text[:TOPIC_CHARS], "truncated": len(text) > TOPIC_CHARS}


def research_agent() -> Any:
    """The agent (a DexAgent), built when a run starts: `dex_model` picks up the provider configured at that
    moment, and Pydantic AI is imported only then, so a worker that never runs this task never loads it."""
    try:
        from pydantic_ai import Agent

        from runs.integrations.pydantic_ai import DexAgent, dex_model
    except ImportError as exc:  # the "pydantic-ai" extra isn't installed: the run fails saying so
        raise NonRetriableError(str(missing_extra("pydantic-ai", "Pydantic AI", exc))) from exc
    agent = Agent(
        dex_model(MODEL),
        name="researcher",
        output_type=Answer,
        instructions=INSTRUCTIONS,
        tools=[search_reference, read_topic],
    )
    return DexAgent(agent)


@task("pydantic-research-agent", retry=Retry(attempts=3, initial=1.0), max_duration=timedelta(minutes=15))
def pydantic_research(
    ctx, question: Annotated[str, Field(max_length=2000)] = "How does the with statement use context managers?"
) -> dict:
    """Answers a question about Python from its bundled reference with a Pydantic AI agent (two tools, a
    structured answer); every model request and tool call is a step."""
    result = research_agent().run_sync(question)
    usage = result.usage
    return {
        "answer": result.output.answer,
        "topics": result.output.topics,
        "model_requests": usage.requests,
        "tool_calls": usage.tool_calls,
    }
