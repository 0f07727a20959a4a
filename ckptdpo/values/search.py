"""The search: which checkpoints of each trajectory to probe, the probes batched across trajectories, the rows.

One round asks every unfinished trajectory for its next probes, sends them all in one `backend.generate` call (one
request per probe, `n` = rollouts) and verifies every rollout with one `verify_fn` call. `exhaustive` needs one round;
`binary` needs about log2(n) + 1, the trajectories bisecting side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptdpo.backends.base import GenerationRequest
from ckptdpo.configs import ValuesConfig
from ckptdpo.dto.probe import spread_indices
from ckptdpo.metrics import wilson_interval
from ckptdpo.resample import stable_seed
from ckptdpo.shards import content_id

# verify_fn(items) -> one verdict per item; items are (gold, continuation, finish_reason), verdicts have `status`
# and `is_correct` (see `ckptdpo.verify.Verdict`).
VerifyFn = Callable[[Sequence[tuple[Any, str, str | None]]], Sequence[Any]]

# Verdicts of a trajectory that say it went wrong: a final answer that does not verify, or none at all.
WRONG_STATUSES = ("incorrect", "no_answer")


@dataclass(frozen=True)
class Rollout:
    """One continuation drawn while estimating a checkpoint's value, with its verdict."""

    draw: int
    text: str
    num_tokens: int
    finish_reason: str
    status: str
    correct: bool  # verified correct and not cut at `length`


@dataclass
class Probe:
    """A probed checkpoint: its rollouts and what they say."""

    index: int  # 1-based checkpoint index
    char: int
    round: int
    seed: int
    rollouts: list[Rollout]

    @property
    def successes(self) -> int:
        return sum(r.correct for r in self.rollouts)

    @property
    def value(self) -> float:
        return self.successes / len(self.rollouts)

    def attempt_id(self, sample_id: str, draw: int) -> str:
        """The content id of one rollout (a `critical` pair's `attempt_id`)."""
        return content_id("values", sample_id, self.index, draw, self.seed)


@dataclass
class Search:
    """The state of one trajectory's search.

    binary keeps the bisection bounds: every checkpoint before `lo` is at or above the threshold (probed, or taken to
    be so because a later one is), `hi` is the first checkpoint known to be below it (n + 1: none so far), and the
    first error lies in [lo, hi]. Each probe halves that range, so the search ends after ceil(log2(n + 1)) probes.
    """

    trajectory: dict[str, Any]
    mode: str
    threshold: float
    max_probes: int | None  # from max_rollouts_per_trajectory; None: no cap
    probes: dict[int, Probe] = field(default_factory=dict)
    lo: int = 1
    hi: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        self.hi = self.num_checkpoints + 1

    @property
    def num_checkpoints(self) -> int:
        return len(self.trajectory["checkpoint_chars"])

    @property
    def sample_id(self) -> str:
        return self.trajectory["sample_id"]

    def _plan(self) -> list[int]:
        """Every checkpoint this search would still probe if nothing capped it."""
        if self.mode == "exhaustive":
            return [i for i in range(1, self.num_checkpoints + 1) if i not in self.probes]
        return [(self.lo + self.hi) // 2] if self.lo < self.hi else []

    def next_probes(self) -> list[int]:
        """The checkpoints to probe this round ([] once done, failed or out of budget)."""
        if self.error is not None:
            return []
        wanted = self._plan()
        if self.max_probes is None:
            return wanted
        left = self.max_probes - len(self.probes)
        if left <= 0:
            return []
        if self.mode == "exhaustive" and len(wanted) > left:
            # Under a cap, exhaustive probes an even spread from the first checkpoint to the last.
            return [wanted[i - 1] for i in spread_indices(len(wanted), left)]
        return wanted[:left]

    def record(self, probe: Probe) -> None:
        self.probes[probe.index] = probe
        if self.mode == "binary":
            if probe.value < self.threshold:
                self.hi = probe.index
            else:
                self.lo = probe.index + 1

    @property
    def resolved(self) -> bool:
        """Whether the search ran to its end: every checkpoint probed, or the bisection closed."""
        return self.error is None and not self._plan()

    @property
    def critical_index(self) -> int | None:
        """The first probed checkpoint below the threshold (every earlier probed one is at or above it), or None."""
        return next((i for i in sorted(self.probes) if self.probes[i].value < self.threshold), None)

    @property
    def rollouts_used(self) -> int:
        return sum(len(p.rollouts) for p in self.probes.values())


def select(trajectory: dict[str, Any], which: str) -> bool:
    """Whether `values.trajectories` takes this trajectory (it also needs a checkpoint to probe)."""
    if not trajectory.get("checkpoint_chars"):
        return False
    status = trajectory["status"]
    if which == "correct":
        return status == "correct"
    if which == "incorrect":
        return status in WRONG_STATUSES
    return status == "correct" or status in WRONG_STATUSES


def probe_request(search: Search, index: int, cfg: ValuesConfig) -> GenerationRequest:
    """One request per probe: all rollouts share the prefix (prefix reuse, one route), the seed comes from content."""
    t = search.trajectory
    return GenerationRequest(
        prompt=t["prompt"] + t["completion"][: t["checkpoint_chars"][index - 1]],
        n=cfg.rollouts,
        seed=stable_seed("values", t["sample_id"], index, cfg.seed),
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        route_key=t["sample_id"],
    )


# What the search cost: rounds, backend requests, rollouts and tokens (prompt tokens as the backend reports them).
COUNTERS = ("rounds", "requests", "rollouts", "generated_tokens", "prompt_tokens_requested", "prompt_tokens_computed")


def run_searches(
    searches: Sequence[Search], cfg: ValuesConfig, backend: Any, verify_fn: VerifyFn
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Run every search to its end, round by round; returns the counters and (sample_id, error) of failed requests.

    A failed request (an error result, or fewer samples than asked) ends its trajectory's search with `error` set:
    nothing of that trajectory is recorded, and its rollouts are never counted as wrong.
    """
    counters = dict.fromkeys(COUNTERS, 0)
    failed: list[tuple[str, str]] = []
    while True:
        work = [(s, i) for s in searches for i in s.next_probes()]
        if not work:
            return counters, failed
        counters["rounds"] += 1
        requests = [probe_request(s, i, cfg) for s, i in work]
        results = backend.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"backend.generate returned {len(results)} results for {len(requests)} requests")
        items, owners = [], []
        for k, ((s, _), req, res) in enumerate(zip(work, requests, results, strict=True)):
            counters["requests"] += 1
            counters["prompt_tokens_requested"] += res.prompt_tokens_requested
            counters["prompt_tokens_computed"] += res.prompt_tokens_computed
            error = res.error
            if error is None and len(res.samples) != req.n:
                error = f"asked for {req.n} continuations, got {len(res.samples)}"
            if error is not None:
                if s.error is None:
                    s.error = error
                    failed.append((s.sample_id, error))
                continue
            if s.error is not None:
                continue  # an earlier request of this trajectory failed this round: its search is over
            for sample in res.samples:
                items.append((s.trajectory["gold_answer"], sample.text, sample.finish_reason))
                owners.append(k)
                counters["rollouts"] += 1
                counters["generated_tokens"] += sample.num_tokens
        verdicts = list(verify_fn(items)) if items else []
        if len(verdicts) != len(items):
            raise RuntimeError(f"verify_fn returned {len(verdicts)} verdicts for {len(items)} items")
        per_request: dict[int, list[Any]] = {}
        for k, v in zip(owners, verdicts, strict=True):
            per_request.setdefault(k, []).append(v)
        for k, ((s, index), req, res) in enumerate(zip(work, requests, results, strict=True)):
            if k not in per_request or s.error is not None:
                continue  # failed (this request, or another of the same trajectory this round)
            rollouts = [
                Rollout(
                    draw=j,
                    text=sample.text,
                    num_tokens=sample.num_tokens,
                    finish_reason=sample.finish_reason,
                    status=v.status,
                    correct=v.is_correct is True and sample.finish_reason != "length",
                )
                for j, (sample, v) in enumerate(zip(res.samples, per_request[k], strict=True))
            ]
            char = s.trajectory["checkpoint_chars"][index - 1]
            s.record(Probe(index=index, char=char, round=counters["rounds"], seed=req.seed, rollouts=rollouts))


def make_searches(trajectories: Iterable[dict[str, Any]], cfg: ValuesConfig) -> list[Search]:
    """One search per selected trajectory, in sample_id order (request order never depends on the input's order)."""
    max_probes = None if cfg.max_rollouts_per_trajectory is None else cfg.max_rollouts_per_trajectory // cfg.rollouts
    chosen = sorted((t for t in trajectories if select(t, cfg.trajectories)), key=lambda t: t["sample_id"])
    return [Search(t, cfg.search, cfg.threshold, max_probes) for t in chosen]


def value_rows(search: Search) -> list[dict[str, Any]]:
    """VALUES rows of one search, in checkpoint order."""
    rows = []
    for index in sorted(search.probes):
        p = search.probes[index]
        low, high = wilson_interval(p.successes, len(p.rollouts))
        rows.append(
            {
                "sample_id": search.sample_id,
                "problem_id": search.trajectory["problem_id"],
                "checkpoint_index": index,
                "checkpoint_char": p.char,
                "round": p.round,
                "seed": p.seed,
                "rollouts": len(p.rollouts),
                "successes": p.successes,
                "incorrect": sum(r.status == "incorrect" and not r.correct for r in p.rollouts),
                "value": p.value,
                "ci_low": low,
                "ci_high": high,
                "completion_tokens": sum(r.num_tokens for r in p.rollouts),
            }
        )
    return rows


def trajectory_row(search: Search) -> dict[str, Any]:
    """The VALUE_TRAJECTORIES row of one search."""
    t, critical = search.trajectory, search.critical_index
    status = t["status"]
    return {
        "sample_id": search.sample_id,
        "problem_id": t["problem_id"],
        "status": status,
        "is_correct": True if status == "correct" else False if status == "incorrect" else None,
        "num_checkpoints": search.num_checkpoints,
        "probed": len(search.probes),
        "rollouts_used": search.rollouts_used,
        "completion_tokens": sum(r.num_tokens for p in search.probes.values() for r in p.rollouts),
        "search": search.mode,
        "resolved": search.resolved,
        "critical_index": critical,
        "critical_char": None if critical is None else t["checkpoint_chars"][critical - 1],
    }
