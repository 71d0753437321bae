"""llm_savings: the research agent failing at its last LLM step, then retried (BENCH.md).

In this process, against the bench database, with the local OpenAI-compatible server (runs.ai.testserver)
answering for the providers: a script makes the agent's last LLM call (`summarise`, the only request that
carries the report-writing system prompt) fail with a non-retryable 400 on every model of its failover list,
so the first execution fails at that step. The run is then retried from the dashboard's service
(`services.run_retry`) and driven to completion.

  llm_calls_first      HTTP requests to the LLM server during the first (failed) execution
  llm_calls_retry      HTTP requests during the retry — Dex's promise: exactly 1 (the failed step only)
  naive_calls_retry    what re-running the whole chain would have asked: every LLM step of the run
  cost_saved_fraction  saved_usd / the cost of re-running every LLM step (what a naive retry pays)

A second figure set repeats it with a replay (a new run of the same payload): the response cache answers
every identical request, so the replay makes 0 calls. Counts, not timings: one pass is exact.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from urllib.request import urlopen

from bench.harness import BenchEnv, goal_met, log, rounded

NAME = "llm_savings"
GOAL = {"llm_calls_retry": "== 1"}
TOPICS = {"full": ["context managers", "generators and yield", "exception chaining"], "quick": ["with statement"]}


def _requests(base_url: str) -> int:
    with urlopen(base_url.removesuffix("/v1") + "/_stats") as response:
        return json.load(response)["requests"]


def run(env: BenchEnv) -> dict:
    from django.conf import settings

    from runs import services
    from runs.ai.testserver import serve_in_thread
    from runs.models import Run, RunStatus, StepKind
    from runs.ops.audit import Actor
    from runs.testing import drive, run_task

    started = time.monotonic()
    topics = TOPICS.get(env.sizes.name, TOPICS["quick"])
    script = {"rules": [{"contains": "You write short research reports", "times": 2, "status": 400}]}
    per_topic = []
    for topic in topics:
        server, base_url = serve_in_thread(script=script)
        settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
        try:
            before = _requests(base_url)
            # A topic of its own per pass, so the response cache of an earlier pass can't answer.
            run = run_task("research-agent", {"topic": f"{topic} {env.session}", "depth": 3})
            first_calls = _requests(base_url) - before
            if run.status != RunStatus.FAILED or (run.error or {}).get("step") != "summarise":
                raise RuntimeError(f"expected the run to fail at summarise, got {run.status}: {run.error}")
            before = _requests(base_url)
            services.run_retry(run=run, by=Actor.system("bench"))
            run = drive(Run.objects.get(pk=run.pk))
            retry_calls = _requests(base_url) - before
            llm_steps = list(run.steps.filter(kind=StepKind.AI))
            naive_cost = sum(Decimal(s.meta["usage"]["cost_usd"]) for s in llm_steps)
            before = _requests(base_url)
            replay = drive(services.run_replay(run=run, by=Actor.system("bench")))
            replay_calls = _requests(base_url) - before
        finally:
            server.stop()
        per_topic.append(
            {
                "topic": topic,
                "status_after_retry": run.status,
                "llm_calls_first": first_calls,
                "llm_calls_retry": retry_calls,
                "naive_calls_retry": len(llm_steps),
                "cost_usd": str(run.cost_usd),
                "saved_usd": str(run.saved_usd),
                "naive_retry_cost_usd": str(naive_cost),
                "cost_saved_fraction": float(run.saved_usd / naive_cost) if naive_cost else None,
                "replay_llm_calls": replay_calls,
                "replay_saved_usd": str(replay.saved_usd),
            }
        )
        log(f"{topic}: first {first_calls} calls, retry {retry_calls} (naive {len(llm_steps)}), replay {replay_calls}")

    worst = max(per_topic, key=lambda p: p["llm_calls_retry"])
    fractions = [p["cost_saved_fraction"] for p in per_topic if p["cost_saved_fraction"] is not None]
    figures = {
        "llm_calls_first": worst["llm_calls_first"],
        "llm_calls_retry": worst["llm_calls_retry"],
        "naive_calls_retry": worst["naive_calls_retry"],
        "cost_saved_fraction": rounded(min(fractions)) if fractions else None,
        "replay_llm_calls": max(p["replay_llm_calls"] for p in per_topic),
    }
    goals_met = {name: goal_met(figures[name], goal) for name, goal in GOAL.items()}
    return {
        "figures": figures,
        "goal": GOAL,
        "met": all(goals_met.values()),
        "goals_met": goals_met,
        "per_topic": per_topic,
        "seconds": round(time.monotonic() - started, 1),
        "note": (
            "In-process (runs.testing) against the bench database; the LLM is the local OpenAI-compatible "
            "server reached through the real openai SDK; calls are HTTP requests it counted. The first "
            "execution's failed summarise is 2 requests (the model and its fallback, both refused with 400)."
        ),
    }
