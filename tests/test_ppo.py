"""PPO and RLOO (docs/method.md, "PPO and RLOO"): the pure functions of vcb.py against their definitions, and a few iterations
of each through ppo.py's loop."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ppo
import train
import vcb
from conftest import TINY, run_train
from machinery import config, records, runtime


GAMMAS = st.sampled_from([0.9, 0.99, 1.0])
LAMBDAS = st.sampled_from([0.0, 0.5, 0.95, 1.0])


@st.composite
def episodes(draw, max_b=4, max_t=7):
    """(rewards, values, mask) of B responses of random lengths >= 1, float64, with junk after each end."""
    B, T = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    rewards, values = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return rewards, values, mask


@given(episodes(), GAMMAS, LAMBDAS)
def test_gae_is_the_discounted_sum_of_td_errors(ep, gamma, lam):
    rewards, values, mask = ep
    adv, ret = vcb.gae(rewards, values, mask, gamma, lam)
    for b in range(len(rewards)):
        n = int(mask[b].sum())
        v = torch.cat([values[b, :n], torch.zeros(1, dtype=torch.float64)])  # V after the end is 0
        delta = rewards[b, :n] + gamma * v[1:] - v[:-1]
        for t in range(n):
            want = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
            torch.testing.assert_close(adv[b, t], want)
        torch.testing.assert_close(ret[b, :n], adv[b, :n] + values[b, :n])
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


@given(episodes())
def test_with_gamma_and_lambda_one_the_return_is_the_plain_sum_of_rewards(ep):
    rewards, values, mask = ep
    _, ret = vcb.gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    future = (rewards * mask).flip(1).cumsum(1).flip(1) * mask  # sum_{l >= t} r_l, whatever the values
    torch.testing.assert_close(ret, future)


@given(episodes())
def test_tokens_after_the_end_change_nothing(ep):
    rewards, values, mask = ep
    junk = torch.randn_like(rewards) * 1e3 * (1 - mask)
    logp, old = torch.randn_like(rewards) - 2, torch.randn_like(rewards) - 2
    scores = torch.randn(len(rewards), dtype=torch.float64)
    for a, b in [(vcb.ppo_token_rewards(logp, old, scores, mask, 0.1), vcb.ppo_token_rewards(logp + junk, old - junk, scores, mask, 0.1)),
                 (vcb.gae(rewards, values, mask, 1.0, 0.95)[0], vcb.gae(rewards + junk, values + junk, mask, 1.0, 0.95)[0]),
                 (vcb.whiten(rewards, mask), vcb.whiten(rewards + junk, mask)),
                 (vcb.ppo_policy_loss(logp, old, rewards, mask, 0.2)[0], vcb.ppo_policy_loss(logp + junk, old, rewards + junk, mask, 0.2)[0]),
                 (vcb.ppo_value_loss(values, rewards, old, mask, 0.2), vcb.ppo_value_loss(values + junk, rewards - junk, old + junk, mask, 0.2))]:
        torch.testing.assert_close(a * mask if a.dim() else a, b * mask if b.dim() else b)


@given(episodes())
def test_the_score_lands_on_the_last_real_token(ep):
    _, values, mask = ep
    scores = torch.arange(1.0, len(mask) + 1, dtype=torch.float64)
    r = vcb.ppo_token_rewards(values, values, scores, mask, beta=0.3)  # no KL: only the score remains
    last = mask.sum(-1).long() - 1
    for b in range(len(mask)):
        assert r[b, last[b]] == scores[b] and r[b].sum() == scores[b]


def test_the_kl_reward_is_minus_beta_k1_on_every_token():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5, 9.0]]), torch.tensor([[-1.5, -1.0, -0.5, 3.0]])
    r = vcb.ppo_token_rewards(logp, ref, torch.tensor([2.0]), mask, beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.1, 2.0, 0.0]]))


@given(episodes(), st.floats(0.1, 100), st.floats(-50, 50))
def test_whitening_ignores_shift_and_scale(ep, scale, shift):
    x, _, mask = ep
    if mask.sum() < 2 or x[mask.bool()].std() < 0.1:
        return  # a single token (or equal ones) has no spread to normalise
    # equal up to the 1e-8 added to the variance (relative error at most 1e-8 / variance)
    torch.testing.assert_close(vcb.whiten(x * scale + shift, mask), vcb.whiten(x, mask), atol=1e-4, rtol=1e-4)
    w = vcb.whiten(x, mask)
    assert abs(vcb.masked_mean(w, mask)) < 1e-9 and abs(vcb.masked_mean(w ** 2, mask) - 1) < 1e-6


@given(episodes())
def test_before_any_update_the_ratio_is_exactly_one_and_nothing_is_clipped(ep):
    adv, _, mask = ep
    logp = torch.randn_like(adv) - 3
    loss, stats = vcb.ppo_policy_loss(logp, logp.clone(), adv, mask, clip=0.2)
    assert stats["ratio"] == 1.0 and stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0
    torch.testing.assert_close(loss, vcb.masked_mean(-adv, mask))  # the clipped loss is the unclipped one


def test_the_clip_stops_the_ratio_in_the_direction_of_the_advantage():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    loss, stats = vcb.ppo_policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(-(1.2 - 0.8) / 2))  # both clipped: min(1.5, 1.2), max(0.5, 0.8)
    assert stats["clipfrac"] == 1.0


def test_the_value_loss_takes_the_worse_of_clipped_and_unclipped():
    mask, returns, old = torch.ones(1, 2), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[0.1, 2.0]])  # inside the clip range [-0.2, 0.2], and beyond it (clipped to 0.2)
    expected = 0.5 * ((1.0 - 0.1) ** 2 + max((2.0 - 1.0) ** 2, (0.2 - 1.0) ** 2)) / 2
    torch.testing.assert_close(vcb.ppo_value_loss(values, old, returns, mask, clip=0.2), torch.tensor(expected))


@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 1000), st.floats(0.0, 1.0))
def test_rloo_baseline_never_includes_the_sample_itself(P, k, seed, beta):
    g = torch.Generator().manual_seed(seed)
    scores, kl = torch.randn(P, k, generator=g, dtype=torch.float64), torch.rand(P, k, generator=g, dtype=torch.float64)
    adv = vcb.rloo_advantages(scores, kl, beta)
    R = scores - beta * kl
    for p in range(P):
        for i in range(k):
            others = torch.cat([R[p, :i], R[p, i + 1:]])
            torch.testing.assert_close(adv[p, i], R[p, i] - others.mean())
    bumped = scores.clone()
    bumped[0, 0] += 1.0  # sample 0's own reward moves its advantage by 1 and no baseline of its own
    torch.testing.assert_close((vcb.rloo_advantages(bumped, kl, beta) - adv)[0, 0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(adv.sum(-1), torch.zeros(P, dtype=torch.float64), atol=1e-9, rtol=0)  # zero mean per prompt


def test_the_adaptive_kl_controller_moves_beta_towards_the_target():
    assert vcb.adaptive_beta(0.1, kl=8.0, target=4.0, n=64, horizon=10_000) > 0.1 > vcb.adaptive_beta(0.1, kl=2.0, target=4.0, n=64, horizon=10_000)
    assert vcb.adaptive_beta(0.1, kl=4.0, target=4.0, n=64, horizon=10_000) == 0.1
    assert vcb.adaptive_beta(1.0, kl=1e6, target=1.0, n=100, horizon=100) == pytest.approx(1.2)  # the step is clipped


def test_reinforce_pushes_up_what_beats_its_baseline():
    logps = torch.zeros(3, requires_grad=True)
    vcb.reinforce_loss(logps, torch.tensor([1.0, -1.0, 0.0])).backward()
    assert logps.grad[0] < 0 < logps.grad[1] and logps.grad[2] == 0  # descent raises the first, lowers the second


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "rloo"])
def test_a_few_iterations_move_policy_and_critic_and_log_a_sane_kl(tiny_copy, method):
    cfg = config.parse_args([f"--out_dir={tiny_copy}", *TINY, f"--methods={method}", "--online_iters=4", "--online_prompts=4",
                             "--online_k=2", "--online_lr=3e-3", "--critic_lr=3e-3", "--beta=0.1", "--ppo_target_kl=1e-4",
                             "--ppo_kl_horizon=8"])
    env = runtime.setup(cfg)
    enc = train.tokenizer(cfg)
    task = train.align_task(cfg, method, 0, f"align-{method}", str(tiny_copy / f"policy_{method}.pt"))
    policy, critic = ppo.train(cfg, env, enc, method, 0, task, train.candidates(cfg, env, enc))
    sft, rm = (runtime.load_checkpoint(tiny_copy / f)["model"] for f in ("sft.pt", "rm.pt"))
    assert any(not torch.equal(sft[k], v) for k, v in policy.state_dict().items())
    if method == "ppo":
        assert any(not torch.equal(rm[k], v) for k, v in critic.state_dict().items())
    else:
        assert critic is None  # RLOO has no critic
    curve = [r for r in records.read_curves(tiny_copy / "curves.jsonl") if r["task"] == f"align-{method}"]
    assert [r["step"] for r in curve] == [1, 2, 3, 4]
    kls = [r["kl"] for r in curve]
    assert all(abs(k) < 1e3 for k in kls) and sum(kls) / len(kls) >= -0.05  # the k1 estimate is >= 0 on average
    assert all(0 <= r["eos_rate"] <= 1 for r in curve)
    prev = 0.1
    for r in curve:  # the adaptive controller: beta rises while the KL is above its target, falls below it
        assert (r["beta"] > prev) == (r["kl"] > 1e-4) and r["beta"] != prev
        prev = r["beta"]
    if method == "ppo":
        assert all(r["first_approx_kl"] < 1e-10 for r in curve)  # the first minibatch sees its own old log-probs
        assert {"clipfrac", "approx_kl", "ratio", "value_loss", "score"} <= curve[0].keys()


@pytest.mark.slow
def test_ppo_and_rloo_are_methods_of_the_pipeline(tiny_copy):
    results = json.loads((tiny_copy / "results.json").read_text())["methods"]  # the tiny run has them all
    assert {"ppo", "rloo"} <= results.keys() and 0 <= results["ppo"]["eval"]["win_rate_vs_dpo"] <= 1
    again = run_train(tiny_copy, "--stage=align", "--online_iters=3")  # their own options redo them alone
    assert again.returncode == 0, again.stderr[-3000:]
    assert "align-vcb: up to date" in again.stdout and "align-ppo iteration 3/3" in again.stdout
    assert "align-rloo iteration 3/3" in again.stdout
