"""research-agent: plan search queries with an LLM, search a real offline corpus, write a cited report.

The corpus is Python's own reference documentation as bundled with the interpreter (`pydoc_data.topics`,
what `help("with")` shows): ~80 topics such as "with", "try", "exceptions", "context-managers". It is split
into paragraphs and ranked with BM25, so searching needs no network and gives the same answer every time.

Runs offline against the local LLM server (`manage.py llm-server`, or the test suite's in-process one) and for
real with an API key: the model is "gpt-5-mini", failing over to "claude-haiku".

Pages on the web can be added with `urls`: each is fetched by `fetch_url`, a tool (also usable with
`ctx.ai.run_tools`) that refuses private, loopback and link-local addresses, on every redirect too
(runs.safe_fetch): a URL an LLM or a user typed must not reach the server's own network (SSRF).
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from datetime import timedelta
from functools import lru_cache
from typing import Annotated

from pydantic import Field

from runs import safe_fetch
from runs.sdk import Retry, task

MODEL = "gpt-5-mini"
FALLBACKS = ["claude-haiku"]
PASSAGES_PER_QUERY = 3
EXCERPT_CHARS = 600
MAX_DEPTH = 8
PAGE_CHARS = 4000
MAX_URLS = 5

_WORD = re.compile(r"[a-z_][a-z0-9_]*")
_STOPWORDS = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "how",
        "in",
        "is",
        "it",
        "of",
        "on",
        "or",
        "the",
        "to",
        "what",
        "when",
        "which",
        "who",
        "why",
        "with",
        "does",
        "do",
        "about",
        "into",
        "vs",
        "versus",
        "using",
        "use",
        "python",
    }
)
# A list item the model may write: "1. foo", "2) foo", "- foo", "* foo", "• foo".
_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|\(\d+\))\s*")


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def keywords(text: str) -> list[str]:
    """The words of `text` worth searching for, in order, without duplicates or stop words."""
    seen: dict[str, None] = {}
    for word in tokens(text):
        if word not in _STOPWORDS and len(word) > 1:
            seen.setdefault(word, None)
    return list(seen)


# --- planning ---------------------------------------------------------------------------------------------


def plan_messages(topic: str, depth: int) -> list[dict]:
    return [
        {
            "role": "system",
            "content": (
                "You plan searches over the Python language reference. Answer with exactly "
                f"{depth} short search queries, one per line, and nothing else."
            ),
        },
        {"role": "user", "content": f"Research topic: {topic}"},
    ]


def parse_queries(answer: str, topic: str, depth: int) -> list[str]:
    """One query per line of the model's answer (bullets and numbering stripped). When the answer isn't a
    list — a single sentence, a refusal, prose — fall back to the topic itself and then its keywords."""
    lines = []
    for raw in answer.splitlines():
        line = _BULLET.sub("", raw).strip().strip("\"'`").strip()
        if line and not line.endswith(":") and len(line) <= 200 and keywords(line):
            lines.append(line)
    is_list = len(lines) >= min(2, depth) and len(lines) <= depth * 2
    queries = lines if is_list else [topic, *keywords(topic)]
    unique = list(dict.fromkeys(q for q in queries if q.strip()))
    return unique[:depth] or [topic]


# --- search over the bundled Python documentation -------------------------------------------------------


class Corpus:
    """BM25 over the paragraphs of `pydoc_data.topics`. Ties break by topic name then position, so the
    ranking is deterministic."""

    K1 = 1.5
    B = 0.75

    def __init__(self, documents: dict[str, str]):
        self.passages: list[tuple[str, str]] = []  # (topic, paragraph)
        for topic in sorted(documents):
            for paragraph in re.split(r"\n\s*\n", documents[topic]):
                text = paragraph.strip()
                if len(tokens(text)) >= 5 and not set(text) <= set("*=-~ \n"):
                    self.passages.append((topic, text))
        self.counts = [Counter(tokens(f"{topic.replace('-', ' ')} {text}")) for topic, text in self.passages]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.average = sum(self.lengths) / max(1, len(self.lengths))
        frequency: Counter[str] = Counter()
        for counts in self.counts:
            frequency.update(counts.keys())
        n = len(self.passages)
        self.idf = {term: math.log(1 + (n - df + 0.5) / (df + 0.5)) for term, df in frequency.items()}

    def search(self, query: str, limit: int = PASSAGES_PER_QUERY) -> list[dict]:
        terms = keywords(query) or tokens(query)
        scored = []
        for i, counts in enumerate(self.counts):
            score = 0.0
            for term in terms:
                tf = counts.get(term)
                if tf:
                    norm = self.K1 * (1 - self.B + self.B * self.lengths[i] / self.average)
                    score += self.idf[term] * tf * (self.K1 + 1) / (tf + norm)
            if score > 0:
                topic = self.passages[i][0]
                # A topic named like the query (e.g. "with") is the canonical page: a small boost.
                if topic in terms or topic.replace("-", " ") == " ".join(terms):
                    score *= 1.25
                scored.append((-score, topic, i))
        scored.sort()
        hits = []
        per_topic: Counter[str] = Counter()
        for negative, topic, i in scored:
            if len(hits) == limit:
                break
            if per_topic[topic] == 2:  # leave room for other topics
                continue
            per_topic[topic] += 1
            text = self.passages[i][1]
            excerpt = text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS].rsplit(" ", 1)[0] + " …"
            hits.append({"topic": topic, "score": round(-negative, 3), "passage": excerpt})
        return hits


@lru_cache(maxsize=1)
def corpus() -> Corpus:
    from pydoc_data.topics import topics

    return Corpus(topics)


def search_docs(query: str) -> dict:
    """Search the bundled Python reference for `query`: its best passages with their topic names."""
    return {"query": query, "hits": corpus().search(query)}


# --- fetching pages from the web --------------------------------------------------------------------------

_INVISIBLE = re.compile(r"<(script|style|noscript|template)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"[ \t\r\f\v]+")


def page_text(text: str, content_type: str) -> str:
    """The readable text of a fetched page: an HTML page without its markup, scripts and styles."""
    if "html" in content_type.lower() or text.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
        text = html.unescape(_TAG.sub(" ", _INVISIBLE.sub(" ", text)))
    lines = (_SPACE.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def fetch_url(url: str) -> dict:
    """Fetch a public web page (http or https) and return its text (at most 4000 characters). Addresses on
    private networks, loopback and link-local ones (e.g. 169.254.169.254) are refused, on redirects too."""
    try:
        page = safe_fetch.fetch(url)
    except safe_fetch.FetchError as exc:
        # An answer the model can read and act on, not a failed step: the URL is simply not available.
        return {"url": url, "error": str(exc)}
    text = page_text(page.text, page.content_type)
    return {
        "url": page.url,
        "status": page.status,
        "text": text[:PAGE_CHARS],
        "truncated": page.truncated or len(text) > PAGE_CHARS,
    }


TOOLS = [search_docs, fetch_url]


# --- summarising ------------------------------------------------------------------------------------------


def report_messages(topic: str, results: list[dict], pages: list[dict] | None = None) -> list[dict]:
    blocks = []
    for result in results:
        for hit in result["hits"]:
            blocks.append(f"[{hit['topic']}] (for “{result['query']}”)\n{hit['passage']}")
    for page in pages or ():
        body = page["text"] if "text" in page else f"(not available: {page['error']})"
        blocks.append(f"[{page['url']}] (web page)\n{body}")
    context = "\n\n".join(blocks) or "(no passages found)"
    return [
        {
            "role": "system",
            "content": (
                "You write short research reports from the passages of the Python language reference you are "
                "given, and only from them. Cite the topic of each fact in square brackets, like [with]. "
                "If the passages don't answer the question, say so.\n\nPassages:\n\n" + context
            ),
        },
        {"role": "user", "content": f"Write a report on: {topic}"},
    ]


def collect_sources(results: list[dict]) -> list[dict]:
    """Every topic the report drew on, once, best score first, with the queries that found it."""
    best: dict[str, dict] = {}
    for result in results:
        for hit in result["hits"]:
            entry = best.setdefault(hit["topic"], {"topic": hit["topic"], "score": 0.0, "queries": []})
            entry["score"] = max(entry["score"], hit["score"])
            if result["query"] not in entry["queries"]:
                entry["queries"].append(result["query"])
    return sorted(best.values(), key=lambda s: (-s["score"], s["topic"]))


def with_citations(text: str, sources: list[dict]) -> str:
    """The model's report, followed by its sources (the model may forget to cite; the reader shouldn't)."""
    if not sources:
        return text.strip()
    lines = [f"- [{s['topic']}] Python reference, `help({s['topic']!r})`" for s in sources]
    return text.strip() + "\n\nSources:\n" + "\n".join(lines)


@task(
    "research-agent",
    retry=Retry(attempts=4, backoff=2.0, initial=1.0, max_delay=60),
    max_duration=timedelta(minutes=30),
    concurrency=5,
)
def research_agent(
    ctx,
    topic: Annotated[str, Field(min_length=1, max_length=500)],
    depth: Annotated[int, Field(ge=1, le=10)] = 3,
    urls: Annotated[list[str] | None, Field(max_length=5)] = None,
) -> dict:
    """Researches `topic` in the Python language reference bundled with the interpreter: an LLM plans
    `depth` search queries, each is searched (BM25 over the reference's paragraphs), and the LLM writes a
    report from the passages found, streamed live, citing the topics it used. Public web pages given in
    `urls` (at most 5) are read too."""
    depth = max(1, min(int(depth), MAX_DEPTH))
    ctx.set_metadata("progress", {"stage": "plan"})
    plan = ctx.ai.infer("plan", model=MODEL, fallbacks=FALLBACKS, messages=plan_messages(topic, depth))
    queries = parse_queries(plan.text, topic, depth)
    ctx.log.info("searching for %d queries: %s", len(queries), "; ".join(queries))

    results = []
    for i, query in enumerate(queries):
        ctx.set_metadata("progress", {"stage": "search", "done": i, "of": len(queries)})
        results.append(ctx.step("search", search_docs, query, retry=Retry(attempts=2, initial=0.5)))
    ctx.set_metadata("progress", {"stage": "search", "done": len(queries), "of": len(queries)})

    pages = [ctx.step("fetch", fetch_url, url) for url in (urls or [])[:MAX_URLS]]

    ctx.set_metadata("progress", {"stage": "summarise"})
    report = ctx.ai.infer(
        "summarise", model=MODEL, fallbacks=FALLBACKS, messages=report_messages(topic, results, pages), stream=True
    )
    sources = collect_sources(results)
    ctx.set_metadata("progress", {"stage": "done", "sources": len(sources)})
    out = {"report": with_citations(report.text, sources), "sources": sources, "queries": queries}
    if urls:
        out["pages"] = [{k: v for k, v in page.items() if k != "text"} for page in pages]
    return out
