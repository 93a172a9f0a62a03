"""Who is kept in place of whom: the paper's connected components, or stars that cannot chain.

``components`` (the published rule): every component of the similarity graph keeps one image,
the largest width x height (then the smallest uid), and drops all others, however unlike the
kept image they are: A~B and B~C drop C as a copy of A even when A and C fail the test.

``star``: inside each component, the best remaining image (same order) is kept and drops only
the remaining members that pass the stage's own test *against it* (``passes``: similarity above
the threshold, Hamming distance within the radius, geometric verification); then the next best
remaining image, and so on. Every drop then passes the test against the image kept in its place
(``local_copy_dedup``'s test also accepts a copy of a dropped member's part that matches the
kept image, a relay: see ``local_steps.DirectVerdicts``).

Components of two need no work (their one edge is the test passing). Larger ones are tested
rep against remaining members in chunks of ``chunk`` candidates, so a giant component (a chain
of 10^5 images) is never compared as one matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Passes = Callable[[int, np.ndarray], np.ndarray]
GROUPINGS = ("components", "star")


def priority_order(labels: np.ndarray, area: np.ndarray, uid: np.ndarray) -> np.ndarray:
    """Rows by component, then keep priority: largest area, then smallest uid."""
    return np.lexsort((np.asarray(uid, np.int64), -np.asarray(area, np.float64), np.asarray(labels, np.int64)))


def star_keepers(labels: np.ndarray, area: np.ndarray, uid: np.ndarray, passes: Passes, chunk: int = 8192) -> np.ndarray:
    """Index of the image each row is kept in place of (its own index when it is kept)."""
    n = len(labels)
    keeper = np.arange(n)
    if n == 0:
        return keeper
    order = priority_order(labels, area, uid)
    lab = np.asarray(labels)[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    ends = np.r_[starts[1:], n]
    for a, b in zip(starts, ends):
        if b - a < 2:
            continue
        members = order[a:b]
        if b - a == 2:  # one edge: the pair passed the test
            keeper[members[1]] = members[0]
            continue
        alive = np.ones(len(members), bool)
        for i in range(len(members)):
            if not alive[i]:
                continue
            rest = np.flatnonzero(alive[i + 1 :]) + i + 1
            for s in range(0, len(rest), chunk):
                cand = rest[s : s + chunk]
                hit = cand[np.asarray(passes(int(members[i]), members[cand]), bool)]
                keeper[members[hit]] = members[i]
                alive[hit] = False
            alive[i] = False
    return keeper
