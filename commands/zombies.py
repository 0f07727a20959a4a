"""Zombie flow runs: runs that Prefect shows as running whose process is gone (worker or machine died, `kill -9`
with the worker down). Left alone they hold their deployment's concurrency slot and never end.

Two detectors: Prefect's own, an automation that marks a running flow run `Crashed` when its heartbeats stop
(flow runs send one every HEARTBEAT_S), for workers anywhere; and `crash_dead_runs`, which `ckptdpo server up`,
`status` and a restart run at once for the local workers' runs: a recorded process id that is not alive on this
machine is a dead run. Crashing a run releases its slot, and Retry in the UI resumes it from its shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

HEARTBEAT_S = 30  # flow runs send a heartbeat this often (Prefect's minimum)
ZOMBIE_AFTER_S = 4 * HEARTBEAT_S  # no heartbeat for this long: the run's process is gone
ZOMBIE_AUTOMATION = "ckptdpo: crash zombie flow runs"
DEAD_MESSAGE = "The flow run's process is gone (its worker or machine stopped); Retry resumes it from its shards."


def zombie_automation() -> dict[str, Any]:
    """Prefect's zombie detection: a running flow run whose heartbeats stopped (its worker or machine died) is marked
    crashed, which frees its concurrency slot and lets the UI's Retry resume it from its shards."""
    terminal = ("Completed", "Failed", "Cancelled", "Crashed")
    return {
        "name": ZOMBIE_AUTOMATION,
        "description": f"No flow-run heartbeat for {ZOMBIE_AFTER_S} s: the flow run's process is gone.",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", *(f"prefect.flow-run.{t}" for t in terminal)],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "within": ZOMBIE_AFTER_S,
            "threshold": 1,
        },
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED", "message": DEAD_MESSAGE}],
    }


def ensure_zombie_automation(api_url: str) -> None:
    """Create the zombie automation unless a server started earlier on this database has it already."""
    body = {"automations": {"name": {"any_": [ZOMBIE_AUTOMATION]}}}
    if httpx.post(f"{api_url}/automations/filter", json=body, timeout=30).raise_for_status().json():
        return
    httpx.post(f"{api_url}/automations/", json=zombie_automation(), timeout=30).raise_for_status()


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def crash_dead_runs(api_url: str, pools: list[str]) -> list[str]:
    """Mark `Crashed` the running flow runs of `pools` (served by this machine's workers) whose process is gone."""
    body = {
        "flow_runs": {"state": {"type": {"any_": ["RUNNING", "CANCELLING"]}}},
        "work_pools": {"name": {"any_": pools}},
    }
    runs = httpx.post(f"{api_url}/flow_runs/filter", json=body, timeout=30).raise_for_status().json()
    crashed = []
    for run in runs:
        pid = str(run.get("infrastructure_pid") or "").rsplit(":", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            state = {"type": "CRASHED", "name": "Crashed", "message": DEAD_MESSAGE}
            r = httpx.post(f"{api_url}/flow_runs/{run['id']}/set_state", json={"state": state}, timeout=30)
            if r.is_success and r.json().get("status") == "ACCEPT":
                crashed.append(run["id"])
    return crashed
