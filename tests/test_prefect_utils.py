"""The cache policy: inputs plus the code and prompts a task builds on."""

from __future__ import annotations

import random

from prefect import flow, task

from doctune.prefect_utils import CACHE, code_digest
from tasks import synthesize


def test_code_digest_follows_the_module_text(tmp_path):
    module = tmp_path / "stage.py"
    module.write_text("def keep(q):\n    return q.endswith('?')\n")
    first = code_digest(module)
    assert code_digest(module) == first
    other = tmp_path / "stage2.py"
    other.write_text("def keep(q):\n    return q.endswith(('?', '？'))\n")  # a helper fixed
    assert code_digest(other) != first
    assert code_digest(synthesize.__file__) not in (first, code_digest(other))


calls = []


@task(cache_policy=CACHE, persist_result=True)
def double(x: int) -> int:
    calls.append(x)
    return 2 * x


def test_a_task_with_the_policy_is_cached_on_its_inputs(prefect_server):
    @flow
    def twice(x: int) -> tuple[int, int]:
        return double(x), double(x)

    x = random.randrange(10**12)  # new each run, so no earlier run's cached result answers
    assert twice(x) == (2 * x, 2 * x)
    assert calls.count(x) == 1
