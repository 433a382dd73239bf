"""The losses' invariants (docs/method.md, "Properties that hold whatever the paper's exact constants"),
their exact values, and the closed-form theory. Property tests run in float64 so that equalities
can be checked tightly; the losses keep float64 and upcast anything narrower to float32."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vcb


BETAS = st.sampled_from([0.1, 0.5, 1.0, 3.0])
LAMS = st.sampled_from([0.0, 0.1, 1.0, 5.0])
LOGP = st.floats(-30, 0, allow_nan=False)


@st.composite
def candidate_sets(draw, min_n=2, max_n=6, max_b=4, ties=False):
    """(policy_logps, ref_logps, rewards), each (B, n) float64. Without ties every prompt's rewards
    are distinct multiples of 0.01, so sigma(x) > 0.004 is well above the floor."""
    B, n = draw(st.integers(1, max_b)), draw(st.integers(min_n, max_n))

    def matrix(elements, unique=False):
        rows = [draw(st.lists(elements, min_size=n, max_size=n, unique=unique)) for _ in range(B)]
        return torch.tensor(rows, dtype=torch.float64)

    rewards = matrix(st.integers(-300, 300), unique=not ties) / 100
    return matrix(LOGP), matrix(LOGP), rewards


def per_prompt(B):
    return st.lists(st.floats(-50, 50, allow_nan=False), min_size=B, max_size=B).map(
        lambda v: torch.tensor(v, dtype=torch.float64)[:, None])


def close(a, b, tol=1e-7):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b.expand_as(a), rtol=tol, atol=tol)


# ---- Z(x) cancels: the difference method (docs/method.md, "VCB: the difference method keeps the reward")

@given(candidate_sets(), BETAS, LAMS, st.data())
def test_log_partition_cancels_from_policy_and_reference(sets, beta, lam, data):
    policy, ref, r = sets
    c_pi, c_ref = data.draw(per_prompt(len(r))), data.draw(per_prompt(len(r)))
    base = vcb.vcb_loss(policy, ref, r, beta, lam)
    close(vcb.vcb_loss(policy + c_pi, ref, r, beta, lam), base)   # log Z(x) added to log pi
    close(vcb.vcb_loss(policy, ref + c_ref, r, beta, lam), base)  # ... or to log pi_sft


@given(candidate_sets(), BETAS, LAMS, st.data())
def test_reward_shift_and_positive_scale_per_prompt_leave_loss_unchanged(sets, beta, lam, data):
    policy, ref, r = sets
    shift = data.draw(per_prompt(len(r)))
    scale = data.draw(st.lists(st.floats(0.01, 100), min_size=len(r), max_size=len(r)))
    scale = torch.tensor(scale, dtype=torch.float64)[:, None]
    close(vcb.vcb_loss(policy, ref, r * scale + shift, beta, lam), vcb.vcb_loss(policy, ref, r, beta, lam))


@given(candidate_sets(), BETAS, LAMS, st.data())
def test_permuting_candidates_leaves_every_loss_unchanged(sets, beta, lam, data):
    policy, ref, r = sets
    perm = torch.tensor(data.draw(st.permutations(range(r.size(1)))))
    p2, ref2, r2 = policy[:, perm], ref[:, perm], r[:, perm]
    close(vcb.vcb_loss(p2, ref2, r2, beta, lam), vcb.vcb_loss(policy, ref, r, beta, lam))
    close(vcb.rrhf_loss(p2 / 10, r2, reduction="none"), vcb.rrhf_loss(policy / 10, r, reduction="none"))
    for loss_fn in (vcb.dpo_loss, vcb.ipo_loss, vcb.slic_loss):
        close(vcb.pairwise_loss(loss_fn, p2, ref2, r2, beta), vcb.pairwise_loss(loss_fn, policy, ref, r, beta))


# ---- the optimum: zero loss there, and gradient descent finds it

@given(candidate_sets(), BETAS, LAMS)
def test_closed_form_optimum_has_zero_loss(sets, beta, lam):
    _, ref, r = sets
    optimum = vcb.optimal_policy(ref, r, beta)
    close(optimum.exp().sum(-1), torch.ones(len(r)))
    close(vcb.vcb_loss(optimum, ref, r, beta, lam), 0.0, tol=1e-9)
    diag = vcb.vcb_diagnostics(optimum, ref, r, beta)
    assert diag["skipped"] == 0.0
    target_gaps = vcb.vcb_pair_terms(optimum, ref, r, beta)[2]
    if (target_gaps - target_gaps.mean()).abs().max() > 1e-6:  # a correlation needs target gaps that vary (n = 2 gives +-2/beta only)
        assert diag["gap_corr"] == pytest.approx(1.0, abs=1e-9)


@given(candidate_sets(max_n=5, max_b=2), BETAS)
def test_optimum_maximises_reward_minus_kl(sets, beta):
    """pi* = argmax_q E_q[r / sigma] - beta KL(q || pi_sft) on the set: no other q does better."""
    policy, ref, r = sets
    ref = torch.log_softmax(ref, -1)
    sigma = vcb.reward_sigma(r)[:, None]

    def objective(logq):
        q = logq.exp()
        return (q * r / sigma).sum(-1) - beta * (q * (logq - ref)).sum(-1)

    best = objective(vcb.optimal_policy(ref, r, beta))
    assert (best >= objective(torch.log_softmax(policy, -1)) - 1e-9).all()


@given(candidate_sets(max_n=5, max_b=3), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.0, 0.5]))
def test_gradient_descent_on_a_free_softmax_reaches_the_optimum(sets, beta, lam):
    _, ref, r = sets
    ref = torch.log_softmax(ref / 10, -1)
    trained = vcb.train_free_softmax(lambda lp: vcb.vcb_loss(lp, ref, r, beta, lam), ref, steps=300)
    close(trained, vcb.optimal_policy(ref, r, beta), tol=1e-4)


def test_figure1_numbers():
    """The walk-through's Figure 1: VCB puts about 0.44 and 0.50 on the 0.85 and 0.9 responses at
    beta = 1, the optimum; DPO, trained on all pairs, drives the 0.85 response towards 0."""
    probs = vcb.figure1(beta=1.0, lam=0.1, steps=500)
    vcb_p, opt, dpo = probs["VCB, all pairs"], probs["closed-form optimum"], probs["DPO, all pairs"]
    assert vcb_p[1] == pytest.approx(0.44, abs=0.01) and vcb_p[2] == pytest.approx(0.50, abs=0.01)
    close(torch.tensor(vcb_p), torch.tensor(opt), tol=1e-4)
    assert dpo[1] < 0.05 and dpo[2] > 0.9 and dpo[0] < dpo[1]


# ---- order-based losses see only the order; VCB sees the values

@given(candidate_sets(ties=True), BETAS)
def test_order_based_losses_ignore_order_preserving_reward_transforms(sets, beta):
    policy, ref, r = sets
    transformed = torch.exp(3 * r) + r ** 3 - 7  # strictly increasing
    for loss_fn in (vcb.dpo_loss, vcb.ipo_loss, vcb.slic_loss):
        close(vcb.pairwise_loss(loss_fn, policy, ref, transformed, beta),
              vcb.pairwise_loss(loss_fn, policy, ref, r, beta))
    close(vcb.rrhf_loss(policy / 10, transformed, reduction="none"), vcb.rrhf_loss(policy / 10, r, reduction="none"))


def test_vcb_changes_under_an_order_preserving_reward_transform():
    ref = torch.full((1, 3), -math.log(3), dtype=torch.float64)
    r = torch.tensor([[0.1, 0.85, 0.9]], dtype=torch.float64)
    transformed = torch.exp(5 * r)  # same order, different gaps
    policy = vcb.optimal_policy(ref, r, 1.0)
    assert vcb.vcb_loss(policy, ref, r, 1.0, 0.0) < 1e-12
    assert vcb.vcb_loss(policy, ref, transformed, 1.0, 0.0) > 0.05  # the target gaps moved: ~0.077 here
    assert not torch.allclose(vcb.optimal_policy(ref, transformed, 1.0), policy, atol=1e-3)


def test_vcb_keeps_reward_size_where_dpo_sees_the_same_pairs():
    """Two prompts with the same order but different gaps: DPO's loss is the same, VCB's is not."""
    ref = torch.zeros(2, 3, dtype=torch.float64)
    policy = torch.tensor([[0.0, 0.5, 1.0]] * 2, dtype=torch.float64)
    near = torch.tensor([[0.0, 0.95, 1.0]], dtype=torch.float64)
    even = torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64)
    close(vcb.pairwise_loss(vcb.dpo_loss, policy[:1], ref[:1], near, 1.0),
          vcb.pairwise_loss(vcb.dpo_loss, policy[:1], ref[:1], even, 1.0))
    assert vcb.vcb_loss(policy[:1], ref[:1], even, 1.0, 0.0) < vcb.vcb_loss(policy[:1], ref[:1], near, 1.0, 0.0) - 0.1


# ---- VCB's aggregation and skipping (docs/method.md, the choices marked [ours])

@given(candidate_sets(), BETAS)
def test_lam_zero_is_the_mean_and_large_lam_tends_to_the_worst_pair(sets, beta):
    policy, ref, r = sets
    l, _, _, _ = vcb.vcb_pair_terms(policy, ref, r, beta)
    per_prompt, calibrated = vcb.vcb_prompt_losses(policy, ref, r, beta, lam=0.0)
    assert calibrated.all()
    close(per_prompt, l.mean(-1))
    prev = per_prompt
    for lam in (0.01, 0.1, 1.0):  # the LogSumExp mean grows with lam, between the mean and the max
        cur, _ = vcb.vcb_prompt_losses(policy, ref, r, beta, lam=lam)
        assert (cur >= prev - 1e-9).all() and (cur <= l.max(-1).values + 1e-9).all()
        prev = cur
    close(vcb.vcb_prompt_losses(policy, ref, r, beta, lam=1e-7)[0], l.mean(-1), tol=1e-3)
    big, _ = vcb.vcb_prompt_losses(policy, ref, r, beta, lam=1e4)
    worst, slack = l.max(-1).values, 1e-9 * (1 + l.max(-1).values)
    assert (big <= worst + slack).all()  # L(lam) >= max - log(P)/lam: the worst pair
    assert (big >= worst - math.log(l.size(-1)) / 1e4 - slack).all()


@given(candidate_sets(), BETAS, st.sampled_from([1e-30, 1e-12, 1e-7, 1e-4, 0.01, 1.0, 100.0, 1e6]))
def test_the_loss_is_exact_for_every_lam_even_in_float32(sets, beta, lam):
    """L(x) lies between the mean and the max of the pair terms for every lam >= 0, also in float32
    and at lam = 1e-7, where (logsumexp - log P) / lam loses everything to cancellation."""
    policy, ref, r = (t.float() for t in sets)
    l = vcb.vcb_pair_terms(policy, ref, r, beta)[0]
    loss, _ = vcb.vcb_prompt_losses(policy, ref, r, beta, lam)
    slack = 1e-5 * (1 + l.abs().max(-1).values)
    assert (loss >= l.mean(-1) - slack).all() and (loss <= l.max(-1).values + slack).all()
    l64 = l.double()  # the same pair terms in float64, where the naive form is accurate down to lam ~ 1e-12
    if 1e-12 <= lam <= 1.0:
        naive = (torch.logsumexp(lam * l64, dim=-1) - math.log(l.size(-1))) / lam
        torch.testing.assert_close(loss.double(), naive, rtol=1e-5, atol=1e-5)


@given(candidate_sets(), BETAS, st.sampled_from([0.01, 0.1, 1.0]))
def test_the_exact_form_has_the_naive_forms_value_and_gradient(sets, beta, lam):
    policy, ref, r = sets
    policy.requires_grad_(True)
    loss, _ = vcb.vcb_prompt_losses(policy, ref, r, beta, lam)
    l = vcb.vcb_pair_terms(policy, ref, r, beta)[0]
    naive = (torch.logsumexp(lam * l, dim=-1) - math.log(l.size(-1))) / lam  # float64: no cancellation worth the name
    close(loss, naive.detach(), tol=1e-6)
    g, = torch.autograd.grad(loss.sum(), policy)
    g_naive, = torch.autograd.grad(naive.sum(), policy)
    torch.testing.assert_close(g, g_naive, rtol=1e-6, atol=1e-6)


def test_prompts_without_reward_spread_are_skipped_and_counted():
    policy = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -5.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.full((2, 3), -2.0, dtype=torch.float64)
    r = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.3, 0.3]], dtype=torch.float64)
    both = vcb.vcb_loss(policy, ref, r, 1.0, 0.0)
    close(both, vcb.vcb_loss(policy[:1], ref[:1], r[:1], 1.0, 0.0))  # the tied prompt adds nothing
    both.backward()
    assert torch.isfinite(policy.grad).all() and (policy.grad[1] == 0).all()
    assert vcb.vcb_diagnostics(policy, ref, r, 1.0)["skipped"] == 0.5
    none = vcb.vcb_loss(policy[1:], ref[1:], r[1:], 1.0, 0.0)  # every prompt skipped: 0, still differentiable
    assert none.item() == 0.0 and none.requires_grad


def test_loss_inputs_in_bfloat16_are_computed_in_float32():
    policy = torch.randn(2, 4).to(torch.bfloat16)
    r = torch.randn(2, 4)
    assert vcb.vcb_loss(policy, policy.detach(), r, 1.0, 0.1).dtype == torch.float32
    assert vcb.dpo_loss(policy[0], policy[1], policy[0], policy[1], 0.1).dtype == torch.float32


# ---- exact values of the baselines

@given(st.lists(LOGP, min_size=4, max_size=4), BETAS)
def test_dpo_is_ln2_when_the_margin_is_zero(v, beta):
    a, b, c, _ = (torch.tensor([x], dtype=torch.float64) for x in v)
    d = b + c - a  # h = (a - c) - (b - d) = 0
    close(vcb.dpo_loss(a, b, c, d, beta), math.log(2))


@given(BETAS, st.floats(-20, 20))
def test_ipo_is_minimal_at_h_equal_one_over_two_beta(beta, h):
    h_star = torch.tensor([1 / (2 * beta)], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    at_min = vcb.ipo_loss(h_star, zero, zero, zero, beta)
    (grad,) = torch.autograd.grad(at_min.sum(), h_star)
    assert at_min.item() == 0.0 and grad.item() == 0.0
    other = vcb.ipo_loss(torch.tensor([h], dtype=torch.float64), zero, zero, zero, beta)
    close(other, (h - 1 / (2 * beta)) ** 2)


@given(BETAS, st.floats(-20, 20))
def test_slic_hinge_is_zero_once_beta_h_reaches_one(beta, h):
    zero = torch.zeros(1, dtype=torch.float64)
    loss = vcb.slic_loss(torch.tensor([h], dtype=torch.float64), zero, zero, zero, beta).item()
    if beta * h >= 1:
        assert loss == 0.0
    else:
        assert loss == pytest.approx(1 - beta * h)


@given(candidate_sets())
def test_rrhf_rank_term_is_zero_exactly_when_the_order_is_right(sets):
    _, _, r = sets
    in_order = r.argsort(-1).argsort(-1).double() * 0.3 - 5      # p ranked like r
    assert (vcb.rrhf_loss(in_order, r, nll_weight=0.0, reduction="none") == 0).all()
    reversed_ = -in_order                                          # every pair the wrong way round
    assert (vcb.rrhf_loss(reversed_, r, nll_weight=0.0, reduction="none") > 0).all()
    best_nll = -in_order.gather(1, r.argmax(-1, keepdim=True)).squeeze(1)
    close(vcb.rrhf_loss(in_order, r, reduction="none"), best_nll)


@given(candidate_sets(ties=True))
def test_preference_pairs_are_every_strictly_ordered_pair(sets):
    _, _, r = sets
    b, w, l = vcb.preference_pairs(r)
    assert (r[b, w] > r[b, l]).all()
    expected = sum(int((r[i, :, None] > r[i, None, :]).sum()) for i in range(len(r)))
    assert len(b) == expected  # tied candidates give no pair


# ---- the value-aware peers (docs/method.md, "The value-aware peers") and what ties them to VCB

@given(candidate_sets(), BETAS)
def test_vcb_at_lambda_zero_is_n_times_a_pointwise_regression_around_the_prompts_mean(sets, beta):
    """sum_{i<j} (e_i - e_j)^2 = n sum_i (e_i - mean e)^2, e_i = delta_i - r_i / (beta sigma): VCB's
    all-pairs loss is a regression of each delta on its target up to a per-prompt offset, which is free."""
    policy, ref, r = sets
    n, pairs = r.size(1), r.size(1) * (r.size(1) - 1) / 2
    e = (policy - ref) - r / (beta * vcb.reward_sigma(r)[:, None])
    per_prompt, _ = vcb.vcb_prompt_losses(policy, ref, r, beta, lam=0.0)
    close(per_prompt * pairs, n * ((e - e.mean(-1, keepdim=True)) ** 2).sum(-1))


@given(candidate_sets(), BETAS)
def test_rebel_with_one_sigma_per_prompt_is_vcb_at_lambda_zero(sets, beta):
    policy, ref, r = sets
    eta = 1 / (beta * vcb.reward_sigma(r))                     # (B,): REBEL's one scale, made per prompt
    close(vcb.rebel_loss(policy, ref, r, eta), vcb.vcb_loss(policy, ref, r, beta, 0.0))


@given(candidate_sets(max_n=5, max_b=3), st.sampled_from([0.5, 1.0, 2.0]))
def test_vcb_rebel_and_infonca_reach_the_same_optimum_on_a_free_softmax(sets, beta):
    """Each, on a free softmax over a prompt's candidates, converges to the KL-regularised optimum on
    the set with VCB's sigma: REBEL with eta = 1 / (beta sigma(x)), InfoNCA with alpha = sigma(x)."""
    _, ref, r = sets
    ref = torch.log_softmax(ref / 10, -1)
    sigma = vcb.reward_sigma(r)
    optimum = vcb.optimal_policy(ref, r, beta)
    for loss in (lambda lp: vcb.vcb_loss(lp, ref, r, beta, 0.0),
                 lambda lp: vcb.rebel_loss(lp, ref, r, 1 / (beta * sigma)),
                 lambda lp: vcb.infonca_loss(lp, ref, r, beta, sigma)):
        close(minimise(loss, ref), optimum, tol=1e-5)


def minimise(loss_fn, ref_logps):
    """A free softmax over the candidates (one logit each, started at the reference) taken to the
    minimum of loss_fn(policy_logps) by L-BFGS: plain gradient descent crawls where the optimum gives
    a candidate little probability. Returns the log-probs (B, n)."""
    theta = ref_logps.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(torch.log_softmax(theta, -1))
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(theta.detach(), -1)


@given(candidate_sets(min_n=2, max_n=2), BETAS)
def test_odpo_with_no_offset_and_infonca_with_two_candidates_and_a_one_hot_target_are_dpo(sets, beta):
    policy, ref, r = sets
    w, l = r.argmax(-1), r.argmin(-1)                           # distinct rewards: one winner per prompt
    pick = lambda x, k: x.gather(1, k[:, None]).squeeze(1)      # noqa: E731
    dpo = vcb.dpo_loss(pick(policy, w), pick(policy, l), pick(ref, w), pick(ref, l), beta)
    close(vcb.odpo_loss(pick(policy, w), pick(policy, l), pick(ref, w), pick(ref, l), beta, torch.zeros_like(dpo)), dpo)
    one_hot = vcb.infonca_loss(policy, ref, r, beta, alpha=1e-12, reduction="none")  # softmax(r / alpha): the winner
    close(one_hot, dpo)


def test_odpo_asks_a_larger_margin_where_the_rewards_differ_more():
    zero = torch.zeros(2, dtype=torch.float64)
    h = torch.tensor([1.0, 1.0], dtype=torch.float64)           # the same margin for two pairs
    rewards = torch.tensor([[0.0, 0.1, 3.0]], dtype=torch.float64)
    loss = vcb.odpo_pairwise_loss(torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), rewards,
                                  1.0, scale=1.0, reduction="none")
    b, w, l = vcb.preference_pairs(rewards)
    gaps = rewards[b, w] - rewards[b, l]
    assert (loss[gaps.argsort()].diff() > 0).all()              # a wider reward gap, a larger offset, a larger loss
    assert (vcb.odpo_loss(h, zero, zero, zero, 1.0, torch.tensor([0.0, 2.0], dtype=torch.float64)).diff() > 0).all()
