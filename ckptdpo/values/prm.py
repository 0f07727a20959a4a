"""Step labels in TRL's stepwise-supervision format (`prompt`, `completions`, `labels`), with the measured values.

A trajectory's steps are its completion cut at its checkpoints: step i ends where checkpoint i starts, the last step
(n + 1) runs to the end, and the steps join back to the completion exactly (each already ends in its paragraph break,
so PRMTrainer's `step_separator=""` keeps the text as the model wrote it). The value of checkpoint i is measured at
the end of step i. A row holds the steps up to and including the first bad one:

- a critical checkpoint c: steps 1..c, labels true before step c and false for it;
- no checkpoint below the threshold, trajectory wrong (incorrect or no answer): every step, the last one false (the
  error is after the last checkpoint);
- no checkpoint below the threshold, trajectory correct: every step, all true.

`values` holds the value at each step's end where it was measured and null where it was not (binary search infers
the labels between its probes from monotonicity); the last step's is the trajectory's own verdict, 1.0 or 0.0. TRL's
PRMTrainer casts labels to int, so these soft labels travel beside them. Searches stopped by their rollout cap before
they could tell give no row (their labels would be guesses).
"""

from __future__ import annotations

from typing import Any

from ckptdpo.values.pairs import first_bad_step
from ckptdpo.values.search import Search


def split_steps(completion: str, checkpoint_chars: list[int]) -> list[str]:
    """The completion cut at each checkpoint: n + 1 steps that join back to it."""
    cuts = [0, *checkpoint_chars, len(completion)]
    return [completion[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def prm_row(search: Search) -> dict[str, Any] | None:
    """The PRM_STEPS row of one finished search, or None (failed, or stopped by its cap)."""
    if search.error is not None or not search.resolved:
        return None
    t = search.trajectory
    n = search.num_checkpoints
    steps = split_steps(t["completion"], list(t["checkpoint_chars"]))
    bad = first_bad_step(search)
    last = n + 1 if bad is None else bad
    values: list[float | None] = [search.probes[i].value if i in search.probes else None for i in range(1, last + 1)]
    if last == n + 1:
        values[-1] = 1.0 if t["status"] == "correct" else 0.0
    return {
        "prompt": t["prompt"],
        "completions": steps[:last],
        "labels": [True] * (last - 1) + [bad is None],
        "values": values,
        "sample_id": t["sample_id"],
        "problem_id": t["problem_id"],
    }
