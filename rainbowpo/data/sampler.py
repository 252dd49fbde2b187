"""Which pairs go into which micro-batch of which rank at every optimizer step — a pure function of
(seed, epoch, step), so a run restored mid-epoch continues in exactly the same order.

Each epoch is a seeded shuffle cut into steps of `global_batch_pairs`. The remainder becomes its own,
smaller last step when it gives every micro-batch at least one pair; a smaller one (fewer pairs than
world × grad_accum micro-batches) is dropped for that epoch and counted (`dropped_per_epoch`; the next
epoch's shuffle drops other pairs). So no micro-batch ever holds more than micro_batch_pairs pairs —
the run that fits memory on step 1 fits it on the last step too — and no pair is repeated.
A step's pairs are dealt into world × grad_accum micro-batches: in order (pair-count mode) or
longest-first into the lightest bin (token-budget mode, uneven pair counts). Rank r takes bins
[r·grad_accum, (r+1)·grad_accum).
"""

from __future__ import annotations

import math
import random


class StepPlanner:
    def __init__(
        self,
        lengths: list[int],
        global_batch_pairs: int,
        world_size: int,
        grad_accum: int,
        seed: int,
        micro_batch_tokens: int = 0,
        shuffle: bool = True,
    ):
        self.lengths, self.global_batch, self.shuffle = list(lengths), global_batch_pairs, shuffle
        self.world, self.grad_accum, self.seed = world_size, grad_accum, seed
        self.by_tokens = micro_batch_tokens > 0
        self.bins = world_size * grad_accum
        n = len(self.lengths)
        if n < self.bins:
            raise ValueError(
                f"{n} examples cannot fill {world_size} ranks × {grad_accum} micro-batches: "
                "add data or lower the batch/world size"
            )
        full, rest = divmod(n, global_batch_pairs)
        self.steps_per_epoch = full + (1 if rest >= self.bins else 0)
        self.dropped_per_epoch = rest if rest < self.bins else 0
        self._last_order: tuple[int | None, list[int]] = (None, [])

    def _order(self, epoch: int) -> list[int]:
        """The epoch's shuffle, kept for the last epoch asked (planning every step reuses it)."""
        if self._last_order[0] != epoch:
            order = list(range(len(self.lengths)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._last_order = (epoch, order)
        return self._last_order[1]

    def step_pairs(self, epoch: int, step: int) -> list[int]:
        """Example indices of one optimizer step (the last may be a smaller remainder step)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside the epoch's {self.steps_per_epoch} steps")
        order = self._order(epoch)
        start = step * self.global_batch
        return order[start : start + self.global_batch]

    def pairs_in_step(self, epoch: int, step: int) -> int:
        return len(self.step_pairs(epoch, step))

    def step_plan(self, epoch: int, step: int) -> list[list[list[int]]]:
        """[rank][micro] → example indices."""
        pairs = self.step_pairs(epoch, step)
        bins = self._deal_by_tokens(pairs) if self.by_tokens else _split_even(pairs, self.bins)
        return [bins[r * self.grad_accum : (r + 1) * self.grad_accum] for r in range(self.world)]

    def micro_batches(self, epoch: int, step: int, rank: int) -> list[list[int]]:
        return self.step_plan(epoch, step)[rank]

    def _deal_by_tokens(self, pairs: list[int]) -> list[list[int]]:
        bins: list[list[int]] = [[] for _ in range(self.bins)]
        load = [0] * self.bins
        for i in sorted(pairs, key=lambda j: (-self.lengths[j], j)):
            target = min(range(self.bins), key=lambda b: (load[b] > 0, load[b], b))  # empty bins first
            bins[target].append(i)
            load[target] += self.lengths[i]
        position = {j: k for k, j in enumerate(pairs)}
        return [sorted(b, key=position.__getitem__) for b in bins]


def _split_even(items: list[int], parts: int) -> list[list[int]]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def token_budget_grad_accum(
    lengths: list[int],
    global_batch_pairs: int,
    world_size: int,
    budget: int,
    seed: int,
    epochs: int = 1,
    shuffle: bool = True,
) -> int:
    """The fewest micro-batches per rank and step for which no micro-batch of any step of any of `epochs`
    epochs holds more than `budget` tokens (train.micro_batch_tokens), the same on every rank.

    Starts at ⌈heaviest planned step / (world × budget)⌉ and plans every step (the plan is a pure function
    of seed and epoch) until the longest-first dealing fits; at most global / world (one pair per
    micro-batch). ValueError when a single pair is longer than the budget: nothing could fit it.
    """
    longest = max(lengths, default=0)
    if longest > budget:
        raise ValueError(
            f"train.micro_batch_tokens {budget} is below the longest pair ({longest} tokens, prompt + both "
            f"responses): no micro-batch could hold it; raise the budget to at least {longest} or lower "
            "data.max_length"
        )
    cap = max(1, global_batch_pairs // world_size)
    if len(lengths) < world_size:
        return 1  # StepPlanner reports that the data cannot fill the ranks
    plan = dict(lengths=lengths, global_batch_pairs=global_batch_pairs, world_size=world_size, seed=seed)
    heaviest = max(_step_tokens(StepPlanner(**plan, grad_accum=1, shuffle=shuffle), epochs))
    accum = max(1, min(math.ceil(heaviest / (world_size * budget)), cap))
    while not _fits(
        StepPlanner(**plan, grad_accum=accum, micro_batch_tokens=budget, shuffle=shuffle), epochs, budget
    ):
        if accum == cap or len(lengths) < world_size * (accum + 1):
            raise ValueError(
                f"train.micro_batch_tokens {budget}: even {accum} micro-batches per rank leave one over the "
                "budget; raise the budget or make train.global_batch_pairs a multiple of the world size"
            )
        accum += 1
    return accum


def _steps(planner: StepPlanner, epochs: int):
    """(epoch, step) of every optimizer step of `epochs` epochs, in order."""
    return ((epoch, step) for epoch in range(epochs) for step in range(planner.steps_per_epoch))


def _step_tokens(planner: StepPlanner, epochs: int) -> list[int]:
    lengths = planner.lengths
    return [sum(lengths[i] for i in planner.step_pairs(*at)) for at in _steps(planner, epochs)]


def _fits(planner: StepPlanner, epochs: int, budget: int) -> bool:
    lengths = planner.lengths
    return all(
        sum(lengths[i] for i in micro) <= budget
        for at in _steps(planner, epochs)
        for rank in planner.step_plan(*at)
        for micro in rank
    )
