"""Best-of-N from the SFT model: which sample is kept, and the KL of the Best-of-N policy to the SFT model.

Import-light (no torch): the eval stage calls these on plain lists of rewards.

Selection. For one prompt x, N samples y_1..y_N are drawn from the SFT model pi_ref(.|x) and the one
with the highest reward r(x, y) is kept (the first of them on a tie). The Best-of-N policy pi_N is the
distribution of the kept sample.

KL, derivation. Let R = r(x, Y) with Y ~ pi_ref(.|x), F(t) = P(R <= t) and F-(t) = P(R < t). Which
index is kept depends on the N rewards only, and given its reward r a draw is distributed as
pi_ref(.|x, R = r); so the kept sample is pi_ref restricted to the level of the maximum reward, and
P(max = r) = F(r)^N - F-(r)^N. Hence, for y with reward r = r(x, y),

    pi_N(y) / pi_ref(y) = w(r) = (F(r)^N - F-(r)^N) / (F(r) - F-(r))     (an atom of R: P(R = r) > 0)
                        = N F(r)^(N-1)                                   (R continuous: the limit)

    KL(pi_N || pi_ref) = E_{y ~ pi_N}[log w(r(y))].

For a continuous R, U = F(R_kept) is the maximum of N uniforms, U ~ Beta(N, 1), E[log U] = -1/N, so
KL = log N - (N-1)/N exactly (`analytic_kl`). When R has atoms (ties, e.g. VADER's lexicon scores, or
every neutral text scoring exactly 0.5), KL is smaller: log N - (N-1)/N is then an upper bound (Beirami
et al. 2024, "Theoretical guarantees on the best-of-n alignment policy").

KL, estimate (`empirical_kl`). KL depends on pi_ref(.|x) only through the distribution of R, and every
sample drawn for the prompt (all S groups of N, before selection) is an i.i.d. draw of R. The estimate
is the plug-in: the exact KL above for the empirical distribution F^ of those L = S * N rewards,

    KL^(x) = sum over the distinct rewards r of F^:  P^(max = r) * log(P^(max = r) / P^(R = r)),
             P^(max = r) = F^(r)^N - F^-(r)^N.

It handles ties by construction. Its bias: with continuous rewards the L values are distinct and KL^
is a function of (N, L) alone, the KL of Best-of-N on L equally likely atoms, below the true value and
converging to it as L grows: at N = 4 it is 0.5903 (L = 4), 0.6334 (L = 16), 0.6361 (L = 64) against
log 4 - 3/4 = 0.6363 (`tests/test_baselines.py`). The alternative of evaluating N F^(r)^(N-1) at the
kept samples only, with F^ from the prompt's other groups (the kept sample's own group cannot be
used: it is below the kept one by construction), is far more biased at these sizes: 0.52 at N = 4,
S = 4 under continuous rewards. The arm's KL is the mean of KL^(x) over prompts; its standard error
is over prompts (with continuous rewards every prompt gives the same value, and it is 0).
"""
from __future__ import annotations

import math
from typing import Sequence


def analytic_kl(n: int) -> float:
    """KL(Best-of-n || reference) for a continuous reward: log n - (n-1)/n; an upper bound with ties."""
    return math.log(n) - (n - 1) / n


def keep_best(rewards: Sequence[float], n: int) -> list[int]:
    """Indices of the kept sample of each consecutive group of `n` rewards (the first maximum of the group)."""
    if n < 1 or len(rewards) % n:
        raise ValueError(f"keep_best: {len(rewards)} rewards do not split into groups of {n}")
    kept = []
    for start in range(0, len(rewards), n):
        group = rewards[start:start + n]
        kept.append(start + max(range(n), key=lambda i: (group[i], -i)))
    return kept


def empirical_kl(rewards: Sequence[float], n: int) -> float:
    """KL(Best-of-n || reference) when the reference's reward has the empirical distribution of `rewards`
    (i.i.d. reference draws for one prompt): the plug-in estimate of the module docstring."""
    if not rewards:
        raise ValueError("empirical_kl: no rewards")
    total = len(rewards)
    values = sorted(rewards)
    kl, below, i = 0.0, 0, 0
    while i < total:
        j = i
        while j < total and values[j] == values[i]:
            j += 1
        f_below, f_at = below / total, j / total
        p_max = f_at ** n - f_below ** n
        if p_max > 0:
            kl += p_max * math.log(p_max / (f_at - f_below))
        below, i = j, j
    return kl
