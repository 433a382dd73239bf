"""The values-or-ranks experiment's pieces (experiments/values.py): the judge keeps the order, the rank
surrogate keeps each prompt's order, mean and spread exactly and changes only the sizes of the gaps,
and the order-based losses cannot tell the three apart."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import vcb
from experiments import values

REWARDS = st.lists(st.floats(-1, 1, allow_nan=False).map(lambda v: round(v, 3)), min_size=2, max_size=9)


def stats(xs):
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


@given(REWARDS, st.sampled_from(values.KS))
def test_the_judge_keeps_the_order_of_every_pair(rewards, k):
    g = [values.judge(k)(v) for v in rewards]
    for i in range(len(rewards)):
        for j in range(len(rewards)):
            assert (rewards[i] < rewards[j]) == (g[i] < g[j]) and (rewards[i] == rewards[j]) == (g[i] == g[j])
    assert values.judge(0)(0.3) == 0.3 and values.judge(2)(0.5) == pytest.approx(math.e)


@given(REWARDS, st.sampled_from(values.KS))
def test_the_rank_surrogate_keeps_order_mean_and_spread_and_spaces_its_values_evenly(rewards, k):
    g = [values.judge(k)(v) for v in rewards]
    s = values.rank_surrogate(g)
    for i in range(len(g)):
        for j in range(len(g)):
            assert (g[i] < g[j]) == (s[i] < s[j]) and (g[i] == g[j]) == (s[i] == s[j])
    (m, sd), (ms, sds) = stats(g), stats(s)
    assert ms == pytest.approx(m, rel=1e-9, abs=1e-12) and sds == pytest.approx(sd, rel=1e-9, abs=1e-12)
    if len(set(g)) == len(g) and sd > 0:  # no ties: consecutive values one step apart
        steps = {round(b - a, 9) for a, b in zip(sorted(s), sorted(s)[1:])}
        assert len(steps) == 1


def test_ties_share_their_mean_rank_and_equal_rewards_stay_equal():
    assert values.ranks([0.5, 0.1, 0.5, 0.9]) == [1.5, 0.0, 1.5, 3.0]
    assert values.rank_surrogate([0.2, 0.2, 0.2]) == [0.2, 0.2, 0.2]


def test_the_gap_rank_correlation_falls_as_the_judge_makes_the_gaps_uneven():
    even = [-0.9, -0.6, -0.3, 0.0, 0.3, 0.6, 0.9]
    assert values.gap_rank_correlation(even) == pytest.approx(1.0)
    corr = [values.gap_rank_correlation([values.judge(k)(v) for v in even]) for k in values.KS]
    assert corr[0] > corr[1] > corr[2] > corr[3] and corr[3] < 0.8
    assert math.isnan(values.gap_rank_correlation([0.4, 0.4]))


@given(st.integers(0, 2 ** 31 - 1), st.sampled_from(values.KS[1:]))
def test_the_order_based_losses_are_the_same_on_the_true_values_and_their_surrogate(seed, k):
    """DPO, SLiC, IPO and RRHF read only the order: trained on g_k, on its rank surrogate or on VADER,
    their loss and its gradient are the same, so one run of each serves every k."""
    gen = torch.Generator().manual_seed(seed)
    gold = torch.rand(3, 5, generator=gen) * 2 - 1
    true = torch.tensor([[values.judge(k)(v) for v in row] for row in gold.tolist()], dtype=torch.float64)
    surrogate = torch.tensor([values.rank_surrogate(row) for row in true.tolist()], dtype=torch.float64)
    ref = -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 20
    logps = (ref + torch.randn(3, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    for name in ("dpo", "slic", "ipo", "rrhf"):
        m = vcb.METHODS[name]
        out = []
        for rewards in (gold.double(), true, surrogate):
            loss = m.loss(logps, ref, rewards, 0.5, 0.1, None, 1e-6)
            out.append((loss.detach(), torch.autograd.grad(loss, logps)[0]))
        for loss, grad in out[1:]:
            torch.testing.assert_close(loss, out[0][0])
            torch.testing.assert_close(grad, out[0][1])
    vcb_true = vcb.METHODS["vcb"].loss(logps, ref, true, 0.5, 0.1, None, 1e-6)
    vcb_rank = vcb.METHODS["vcb"].loss(logps, ref, surrogate, 0.5, 0.1, None, 1e-6)
    assert not torch.isclose(vcb_true, vcb_rank)  # the value-aware loss does see the difference


def test_the_summary_has_every_budget_of_every_loss_and_k():
    """Each cell of the summary is its own budget's paired difference, not the last budget's."""
    grid = type("Grid", (), {"kls": [4.0, 8.0]})()
    diff = lambda mean: {"mean": mean, "lo": mean - 0.01, "hi": mean + 0.01, "n": 5}  # noqa: E731
    rows = [{"label": f"{m} ({how})", "k": kl, "vs_base": diff(0.1 * kl), "vs_dpo": diff(-0.1 * kl)}
            for m in values.VALUE_AWARE for how in ("true", "rank", "RM") for kl in grid.kls]
    results = {k: {"grid": grid, "tables": {"path/eval": {"rows": rows}}} for k in values.KS}
    corr = {k: {"mean": 0.9, "lo": 0.89, "hi": 0.91, "n": 5} for k in values.KS}
    text = values.summary_tables(results, corr)
    line = next(x for x in text.splitlines() if x.startswith("| vcb | 0 |"))
    assert "+0.400 [+0.390, +0.410] ahead" in line and "+0.800 [+0.790, +0.810] ahead" in line
