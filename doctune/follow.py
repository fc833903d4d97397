"""Follow a flow run from the terminal: what it and its child runs log, as it comes, until it ends.

`doctune nightly` waits for an hour on a small machine; without this it printed one line and then nothing,
and a newcomer could not tell progress from a hang. Shown: warnings and errors of every run, and the
project's own INFO lines (ingest counts, synthesis mode, the exam, training, the decision); Prefect's
"Finished in state Completed()" per task is left out, as are tracebacks past their first line (the UI has
them whole)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Callable
from uuid import UUID

OURS = ("doctune", "tasks", "flows", "prefect.flow_runs")
NOISE = ("Finished in state", "Created task run", "Executing '", "Beginning flow run", "Running on worker",
         "Worker '", "Opening process", "Completed submission", "Process for flow run", "Running 1 deployment",
         "Running deployment", "Executing deployment step", "Deployment step", "All deployment steps",
         "Beginning subflow run", "submitted to infrastructure")
GRACE_S = 3.0  # logs reach the server in batches: a last look this long after the run ended


def shown(name: str, level: int, message: str) -> bool:
    if level >= logging.WARNING:
        return True
    return name.startswith(OURS) and not message.startswith(NOISE) and not message.endswith(NOISE[-1])


def line(run_name: str, timestamp: datetime, message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else ""
    return f"{timestamp.astimezone().strftime('%H:%M:%S')} {run_name:<16.16} {first[:300]}"


async def _follow(flow_run_id: UUID, echo: Callable[[str], None], poll_s: float):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter,
                                                LogFilterFlowRunId, LogFilterTimestamp)
    from prefect.client.schemas.sorting import LogSort

    seen: set = set()
    since = None
    names: dict = {}
    flows: dict = {}
    async with get_client() as client:
        ended_at = None
        while True:
            run = await client.read_flow_run(flow_run_id)
            children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            for r in [run, *children]:  # each line says which flow it comes from: nightly, build_dataset, train...
                if r.flow_id not in flows:
                    flows[r.flow_id] = (await client.read_flow(r.flow_id)).name
                names[r.id] = flows[r.flow_id]
            while True:  # every new line, a page at a time
                logs = await client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(names)),
                                         timestamp=LogFilterTimestamp(after_=since) if since else None),
                    sort=LogSort.TIMESTAMP_ASC, limit=200)
                new = [entry for entry in logs if entry.id not in seen]
                for entry in new:
                    seen.add(entry.id)
                    if shown(entry.name, entry.level, entry.message):
                        echo(line(names.get(entry.flow_run_id, "?"), entry.timestamp, entry.message))
                if logs:
                    since = logs[-1].timestamp
                if len(logs) < 200 or not new:
                    break
            if run.state is not None and run.state.is_final():
                if ended_at is None:
                    ended_at = asyncio.get_running_loop().time()
                elif asyncio.get_running_loop().time() - ended_at >= GRACE_S:
                    return run
                await asyncio.sleep(min(poll_s, GRACE_S))
                continue
            await asyncio.sleep(poll_s)


def follow_run(flow_run_id: UUID, echo: Callable[[str], None] = print, poll_s: float = 5.0):
    """Print the run's and its child runs' log lines as they come; return the flow run once it has ended."""
    return asyncio.run(_follow(flow_run_id, echo, poll_s))
