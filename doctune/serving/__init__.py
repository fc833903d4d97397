"""doctune's local OpenAI-compatible endpoint: the embedded default LLM for synthesis, and the
way a fine-tuned model (or LoRA adapters over the base) is served afterwards.

Why our own server and not `transformers serve`: it checks no API key, ignores temperature/seed
unless sampling is switched on elsewhere, leaves stop strings in the output and serves one request
at a time. Batching concurrent requests is worth ~3x on 2 cores (bench/README.md measures this
server against `transformers serve --continuous-batching`), so:

- one worker thread owns the model (`engine`); HTTP handlers only validate, tokenize and wait on a
  queue (`api`, `handlers`, `jobs`);
- the worker decodes all running requests as rows of one batch with a KV cache (`batch`; a manual
  loop, so each row samples with its own temperature/top_p/seed and stops at its own
  eos/stop/max_tokens: `sampling`);
- new requests join a running batch at a decode step: their prompt tokens go through the same
  forward as the running rows' next tokens, flat and unpadded (`attention.Ragged`), and their cache
  is left-padded onto the batch's; a finished row leaves the batch at once;
- when idle, the first request waits `batch_wait_ms` for others so their prefill is shared;
- embedding requests run a bounded piece at a time between decode steps (`embedding`: whole short
  inputs, or the next tokens of a long one over its own cache), time-shared with the running rows, and
  are dropped when their client leaves; handlers validate and tokenize in a thread, off the event loop;
- prompts that start alike (synthesis' few-shot prompts, a template's default system prompt) reuse
  the stored keys/values of that start and prefill only the rest (`kv_cache.PrefixStore`): on 2 cores
  the prefill of a ~250-token prompt costs more than decoding its answer;
- the cache appends into spare room instead of concatenating at every step (`kv_cache.growing_layer`);
- greedy rows take the head's argmax from bf16 candidates checked in fp32 (`sampling.GreedyHead`), where
  a probe at load finds that faster than fp32 logits: the head reads a fifth of a small model's weights.

The wire format (`protocol`) reuses the response models of the `openai` package. `models.plan_models`
decides what `doctune serve` serves (the base, the promoted adapter, named adapters; or one full fine-tune);
`api.check_exposure` refuses a server that anyone on the network could use.

Dependencies point one way: api -> handlers -> engine -> {batch, embedding, sampling, kv_cache,
attention, loading, jobs}; only api and handlers know HTTP (`protocol`). Imports are absolute: the
cache digest scanner (doctune/prefect_utils.py) skips relative ones.
"""

from doctune.serving.api import KEY_ENV, check_exposure, create_app, run_server
from doctune.serving.models import ServePlan, plan_models

__all__ = ["KEY_ENV", "ServePlan", "check_exposure", "create_app", "plan_models", "run_server"]
