"""Following a run from the terminal (doctune nightly): the run's and its child runs' lines, named by their
flow, without Prefect's per-task noise, until the run has ended. On the session's real Prefect server."""

from __future__ import annotations

import logging

import pytest
from prefect import flow, get_run_logger, task

from doctune.follow import follow_run, shown


@task
def small_step() -> int:
    return 1


@flow(name="child_flow")
def child() -> None:
    get_run_logger().info("child: 3 documents ingested")
    small_step()


@flow(name="parent_flow")
def parent() -> None:
    get_run_logger().info("parent: starting")
    child()
    get_run_logger().warning("parent: a warning a person should see")


def test_shown_keeps_our_lines_and_warnings_and_drops_prefects_noise():
    assert shown("prefect.flow_runs", logging.INFO, "ingested 9 files")
    assert not shown("prefect.task_runs", logging.INFO, "Finished in state Completed()")
    assert not shown("prefect.flow_runs", logging.INFO, "Finished in state Completed()")
    assert not shown("prefect.flow_runs", logging.INFO, "Executing deployment step: set_working_directory")
    assert not shown("prefect.flow_runs", logging.INFO, "Flow run 'rough-harrier' submitted to infrastructure")
    assert shown("prefect.task_runs", logging.ERROR, "Task run failed")
    assert shown("doctune.local_llm", logging.INFO, "stopped the local model server")


@pytest.mark.usefixtures("prefect_server")
def test_follow_prints_the_run_and_its_children_until_it_ends():
    state = parent(return_state=True)
    out: list[str] = []
    run = follow_run(state.state_details.flow_run_id, echo=out.append, poll_s=0.2)
    assert run.state.is_completed()
    text = "\n".join(out)
    assert "parent_flow" in text and "parent: starting" in text and "a warning a person should see" in text
    assert any("child_flow" in line and "child: 3 documents ingested" in line for line in out)
    assert "Finished in state" not in text
