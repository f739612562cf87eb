"""A time budget's plan (train.time_budget): how many optimizer steps fit in the budget, from the pace measured since
the clock started, so the schedule (warm-up, decay, its end) spans exactly the time given.

    planner = BudgetPlanner(budget=60.0, steps_per_epoch=100)
    planner.start(step=1, seconds=0.4)           # after the first step, which pays for warm-up
    total = planner.plan(step=6, seconds=0.9, total=500, force=True)   # the first plan, five steps later
    total = planner.plan(step=40, seconds=4.1, total=total)            # each logged window refines it
"""

from __future__ import annotations

from collections.abc import Callable


class BudgetPlanner:
    """Plans the schedule's length for a time budget. `mean` agrees a number across processes (the ranks' mean, so
    every rank plans alike); one process keeps its own."""

    def __init__(self, budget: float, steps_per_epoch: int, mean: Callable[[float], float] = lambda v: v):
        self.budget, self.steps_per_epoch, self.mean = budget, steps_per_epoch, mean
        self.pace_from: tuple[int, float] | None = None  # (step, training seconds) where the clock started
        self.first_plan_at = -1  # the step at which the first plan is made

    @property
    def started(self) -> bool:
        return self.pace_from is not None

    def start(self, step: int, seconds: float) -> None:
        """Start the clock after this process's first step; the first plan comes five steps later, before the warm-up's
        learning rate has moved much."""
        self.pace_from, self.first_plan_at = (step, seconds), step + 5

    def due(self, step: int) -> bool:
        """Whether the clock starts, or the first plan is made, at this step."""
        return not self.started or step == self.first_plan_at

    def plan(self, step: int, seconds: float, total: int, force: bool = False) -> int | None:
        """The schedule's new length at `step`, `seconds` of training into the run: as many steps as the rest of the
        budget allows at the pace since the clock started, ending at an epoch's end when within a tenth of an epoch
        of it; None when `total` stays (a plan within 2% of it is kept, so the learning rate does not jitter)."""
        if force:
            self.first_plan_at = -1
        step0, seconds0 = self.pace_from
        pace = (seconds - seconds0) / max(step - step0, 1)
        left = self.mean(max(0.0, self.budget - seconds) / max(pace, 1e-9))
        new, spe = step + int(left), self.steps_per_epoch
        edge = round(new / spe) * spe
        if abs(new - edge) <= spe // 10 and edge > step:
            new = edge
        if force or abs(new - total) > 0.02 * total or new <= step:
            return max(1, new)
        return None
