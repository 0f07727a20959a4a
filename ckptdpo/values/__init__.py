"""Checkpoint values: where a trajectory went wrong, found without an annotator.

The value of checkpoint i of a trajectory is the share of `values.rollouts` continuations from
`chat(problem) + completion[:checkpoint_chars[i-1]]` that verify correct (a Monte-Carlo estimate with a Wilson 95%
interval). Along a wrong trajectory it falls from about the problem's pass rate towards 0; the first checkpoint whose
value is below `values.threshold`, with every earlier probed one at or above it, is the critical checkpoint: the step
ending there holds the first error (Step-DPO's "first wrong step").

- `exhaustive` probes every checkpoint: the critical checkpoint is the first one below the threshold.
- `binary` bisects, taking the value as non-increasing along the trajectory: it probes ceil(log2(n + 1)) checkpoints
  (n = 8: 4, n = 68: 7, n = 300: 9). When the values are not monotone (a trajectory that recovers and goes wrong
  again, or estimation noise), it still ends on a checkpoint below the threshold right after one at or above it
  (both probed), but not necessarily on the first such drop: a dip it jumped over stays unseen, so the critical
  checkpoint it reports can be later than exhaustive's. Its unprobed checkpoints have no value.
- `max_rollouts_per_trajectory` caps a search: binary stops bisecting, exhaustive probes an even spread; the
  trajectory is then `resolved: false` and its critical checkpoint (the first probed one below) may be late.

From the searches: `critical` pairs (`pairs`), TRL stepwise-supervision rows (`prm`), a value-guided resampling
schedule (`ckptdpo.checkpoints.schedule_value_points`, `resample.policy: value`) and an estimate of what it yields
against a fixed schedule (`schedule.compare_schedules`). Modules: `search` (the probes), `pairs`, `prm`, `estimate`
(the driver), `schedule`, `summary`.
"""

from ckptdpo.values.estimate import ValuesResult, estimate_values
from ckptdpo.values.pairs import PAIR_TYPE, build_critical_pairs, first_bad_step, last_good_checkpoint
from ckptdpo.values.prm import prm_row, split_steps
from ckptdpo.values.schedule import compare_schedules, rows_by_sample
from ckptdpo.values.search import (
    WRONG_STATUSES,
    Probe,
    Rollout,
    Search,
    VerifyFn,
    make_searches,
    probe_request,
    run_searches,
    select,
    trajectory_row,
    value_rows,
)
from ckptdpo.values.summary import summarize_values, values_headline

__all__ = [
    "PAIR_TYPE",
    "WRONG_STATUSES",
    "Probe",
    "Rollout",
    "Search",
    "ValuesResult",
    "VerifyFn",
    "build_critical_pairs",
    "compare_schedules",
    "estimate_values",
    "first_bad_step",
    "last_good_checkpoint",
    "make_searches",
    "probe_request",
    "prm_row",
    "rows_by_sample",
    "run_searches",
    "select",
    "split_steps",
    "summarize_values",
    "trajectory_row",
    "value_rows",
    "values_headline",
]
