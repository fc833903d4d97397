"""Create the automation that marks a flow run Crashed when its heartbeats stop (Prefect's recipe for
"zombie" runs: a worker or machine killed mid-run leaves the run Running forever otherwise, and the
gpu pool's one slot with it). Runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds
(scripts/env.sh); after DOCTUNE_ZOMBIE_AFTER_S without one (default: three missed heartbeats) the run
is Crashed, and running nightly again resumes from the last checkpoint."""

import os
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

every = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"))
after = int(os.environ.get("DOCTUNE_ZOMBIE_AFTER_S", str(3 * every)))
automation = Automation(
    name="crash-silent-runs",
    description=f"A flow run that sent no heartbeat for {after} s is marked Crashed (its worker or machine died).",
    trigger=EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=after),
    ),
    actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                message=f"No heartbeat for {after} s: the worker or its machine stopped.")],
)
print(automation.create().id)
