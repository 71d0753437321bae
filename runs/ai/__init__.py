"""LLM calls for `ctx.ai.infer`: providers behind one small interface, failover, pricing, request hashing and a
local OpenAI-compatible server for development and tests.

- `providers`: `LLMRequest` -> `Completion` through the official `openai` / `anthropic` SDKs, routed by model
  name (`DEX_LLM_PROVIDERS`), and `call_with_failover` (our retry policy, then the next model).
- `pricing`: `cost_usd(model, input_tokens, output_tokens)`, overridable with `DEX_LLM_PRICING`.
- `cache`: `request_hash(...)`, the key of the response cache.
- `testserver`: `manage.py llm_server`, deterministic answers and fault injection.
"""
