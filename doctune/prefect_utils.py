"""Prefect conventions shared by every task module."""

from __future__ import annotations

from prefect.cache_policies import INPUTS, TASK_SOURCE

# Inputs are records or content hashes, never a bare path, so a changed file misses the cache;
# TASK_SOURCE makes a code change miss it too.
CACHE = INPUTS + TASK_SOURCE

# Tasks that talk to a network endpoint retry a bounded number of times.
NETWORK_RETRIES = dict(retries=2, retry_delay_seconds=[5, 30])
