"""`qlora-flow schedule status|resume`: what Prefect 3's CLI does not show about scheduled retraining.

A rejected candidate pauses its model's scheduled deployment (the automation registered by
deployments/deploy.py). Prefect's CLI then still lists the schedule as active, cannot say why
nothing runs, and has no command to resume a deployment. `status` reads the deployments through
Prefect's client and explains each pause from the server's events: the automation action that
paused it and the `model.rejected` event (run id, reasons) that triggered it, or a pause by hand.
`resume` resumes the model's paused scheduled deployments.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

from qlora_flow.config import ConfigError
from qlora_flow.model_events import ALIAS_LABEL, STORE_LABEL

if TYPE_CHECKING:  # Prefect's client is imported when a command runs: `qlora-flow --help` stays fast
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.events import Event

PAUSED_BY_AUTOMATION = "prefect.automation.action.executed"
DEPLOYMENT_UPDATED = "prefect.deployment.updated"


@dataclass
class PauseReason:
    when: datetime
    by: str  # 'automation "<name>"', or who paused it by hand
    rejection: Event | None = None  # the model.rejected event that triggered the automation


@dataclass
class ScheduleStatus:
    model: str
    deployment: str  # <flow>/<deployment>
    deployment_id: UUID
    paused: bool
    schedules: list[str] = field(default_factory=list)
    reason: PauseReason | None = None


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _client() -> SyncPrefectClient:
    from prefect.client.orchestration import get_client

    if not _api_url():
        raise ConfigError(
            "PREFECT_API_URL is not set, so Prefect would start a throwaway server without deployments; "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (scripts/local_stack.sh) or your server's /api URL"
        )
    return get_client(sync_client=True)


def _model_of(deployment: DeploymentResponse) -> str:
    return next((t.removeprefix("model:") for t in deployment.tags if t.startswith("model:")), "?")


def scheduled_deployments(client: SyncPrefectClient, model: str | None) -> list[DeploymentResponse]:
    """The qlora-flow deployments with a schedule (every pool's variant), of one model or all."""
    import httpx
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    tags = ["qlora"] + ([f"model:{model}"] if model else [])
    try:
        found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=tags)))
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the Prefect API at {_api_url()}: {exc}") from None
    scheduled = [d for d in found if d.schedules]
    if not scheduled:
        what = f"of model {model!r} " if model else ""
        raise ConfigError(
            f"no scheduled qlora-flow deployment {what}on {_api_url()}; register them with "
            "`python -m deployments.deploy` (scripts/local_stack.sh does) or check the model name"
        )
    return sorted(scheduled, key=lambda d: (_model_of(d), d.name))


def _latest(client: SyncPrefectClient, event_filter, keep) -> Event | None:
    page = client.read_events(filter=event_filter, limit=50)  # newest first
    return next((e for e in page.events if keep(e)), None)


def pause_reason(client: SyncPrefectClient, deployment_id: UUID) -> PauseReason | None:
    """Why a deployment is paused, from the server's events (kept for PREFECT_SERVER_EVENTS_RETENTION_PERIOD,
    7 days by default).

    A pause is a `prefect.deployment.updated` event (paused -> true); when an automation paused it, the
    automation's `action.executed` event follows that update, so a later update means a pause by hand."""
    from prefect.events.filters import (
        EventFilter,
        EventIDFilter,
        EventNameFilter,
        EventRelatedFilter,
        EventResourceFilter,
    )

    resource = f"prefect.deployment.{deployment_id}"
    update = _latest(
        client,
        EventFilter(event=EventNameFilter(name=[DEPLOYMENT_UPDATED]), resource=EventResourceFilter(id=[resource])),
        lambda e: e.payload.get("updates", {}).get("paused", {}).get("to") is True,
    )
    action = _latest(
        client,
        EventFilter(event=EventNameFilter(name=[PAUSED_BY_AUTOMATION]), related=EventRelatedFilter(id=[resource])),
        lambda e: e.payload.get("action_type") == "pause-deployment",
    )
    if action is not None and (update is None or action.occurred >= update.occurred):
        trigger = next((r.id for r in action.related if r.role == "triggering-event"), None)
        rejection = None
        if trigger:
            event_id = UUID(trigger.removeprefix("prefect.event."))
            page = client.read_events(filter=EventFilter(id=EventIDFilter(id=[event_id])), limit=1)
            rejection = page.events[0] if page.events else None
        return PauseReason(when=action.occurred, by=f'automation "{action.resource.name}"', rejection=rejection)
    if update is not None:
        return PauseReason(when=update.occurred, by="hand (UI, API or `prefect` CLI), not by an automation")
    return None


def schedule_status(model: str | None = None) -> list[ScheduleStatus]:
    with _client() as client:
        statuses = []
        for d in scheduled_deployments(client, model):
            schedules = [
                f"{s.schedule.cron} ({s.schedule.timezone}), {'on' if s.active else 'off'}"
                if hasattr(s.schedule, "cron")
                else f"{s.schedule}, {'on' if s.active else 'off'}"
                for s in d.schedules
            ]
            statuses.append(
                ScheduleStatus(
                    model=_model_of(d),
                    deployment=f"{client.read_flow(d.flow_id).name}/{d.name}",
                    deployment_id=d.id,
                    paused=bool(d.paused),
                    schedules=schedules,
                    reason=pause_reason(client, d.id) if d.paused else None,
                )
            )
    return statuses


def resume(model: str) -> list[ScheduleStatus]:
    """Resume the model's paused scheduled deployments; returns those it resumed (with why they were paused)."""
    paused = [s for s in schedule_status(model) if s.paused]
    with _client() as client:
        for status in paused:
            client.resume_deployment(status.deployment_id)
    return paused


def format_status(statuses: list[ScheduleStatus]) -> str:
    lines = []
    for s in statuses:
        state = "PAUSED" if s.paused else "not paused"
        lines.append(f"{s.model}  {s.deployment}  {state}  schedule: {'; '.join(s.schedules)}  id {s.deployment_id}")
        if not s.paused:
            continue
        if s.reason is None:
            lines.append("    paused; no event on the server says by whom (events past the retention period are gone)")
        else:
            lines.append(f"    paused {s.reason.when:%Y-%m-%d %H:%M:%S} UTC by {s.reason.by}")
            event = s.reason.rejection
            if event is not None:
                run = next((r for r in event.related if r.role == "flow-run"), None)
                flow_run = f", flow run '{run.name}' ({run.id.removeprefix('prefect.flow-run.')})" if run else ""
                lines.append(f"    after {event.event} of run {event.payload.get('run_id')}{flow_run}")
                store, alias = event.resource.get(STORE_LABEL, "?"), event.resource.get(ALIAS_LABEL, "?")
                lines.append(f"    store {store}, alias {alias}; reasons:")
                lines.extend(f"      - {reason}" for reason in event.payload.get("reasons", []))
        lines.append(f"    resume: qlora-flow schedule resume {s.model}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    print(format_status(schedule_status(args.model)))
    return 0


def cmd_resume(args) -> int:
    resumed = resume(args.model)
    if not resumed:
        print(f"ok: no scheduled deployment of {args.model} is paused; nothing to resume")
    for status in resumed:
        why = f" (paused {status.reason.when:%Y-%m-%d %H:%M} UTC by {status.reason.by})" if status.reason else ""
        print(f"ok: resumed {status.deployment}{why}")
    return 0


def add_schedule_parser(sub: argparse._SubParsersAction) -> None:
    """`qlora-flow schedule status [MODEL]` and `qlora-flow schedule resume MODEL` (needs PREFECT_API_URL)."""
    schedule = sub.add_parser("schedule", help="show why scheduled retraining is paused, and resume it")
    actions = schedule.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="each scheduled deployment of MODEL (or all): paused or not, and why")
    status.add_argument("model", nargs="?", help="model name (publish.model_name); all models when left out")
    status.set_defaults(func=cmd_status)
    resume_parser = actions.add_parser("resume", help="resume MODEL's paused scheduled deployments")
    resume_parser.add_argument("model", help="model name (publish.model_name)")
    resume_parser.set_defaults(func=cmd_resume)
