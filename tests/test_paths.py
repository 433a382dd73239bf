"""The path every results table depends on, checked on the CPU: candidates packed after their prompt
give what each sequence gives alone; the sampler's log-probs are the scorer's; the align step computes
the losses of vcb.py; and a few steps of training move what they should."""
import shutil

import pytest
import torch

import config
import data
import evaluate
import methods
import packing
import records
import runtime
import train
import vcb
from conftest import SMALL, TINY, sharp_gpt
from model import response_logps

ENC = data.byte_tokenizer()
EOT = ENC.eot_token


def groups_of(seed, n_groups, n, prompt_len=(3, 12), response_len=(1, 14)):
    """Random prompt groups as packing.encode_group gives them: (<|endoftext|> + prompt, [response +
    <|endoftext|>, ...]), of random lengths."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    tokens = lambda k: torch.randint(0, 256, (k,), generator=g).tolist()  # noqa: E731
    return [([EOT] + tokens(rand(*prompt_len)), [tokens(rand(*response_len)) + [EOT] for _ in range(n)])
            for _ in range(n_groups)]


def padded(groups, block_size):
    """Every (prompt, response) of groups as its own right-padded row, cut to block_size as pack() cuts
    a group (packing.fit): the reference that packing must reproduce. Returns (idx, response mask)."""
    rows = []
    for prompt, responses in groups:
        prompt, responses, _ = packing.fit(prompt, responses, block_size)
        rows += [(prompt + r, len(prompt)) for r in responses]
    return data.collate(rows, EOT)


# ---- 1. packed equals padded, at the model level

@pytest.mark.parametrize("block_size", [64, 20])  # 20: prompts cut from the left, long responses from the right
def test_packed_log_probs_and_rewards_equal_each_sequence_alone(block_size):
    model = sharp_gpt(1, block_size=block_size, reward_head=True)
    groups = groups_of(0, 4, 3)
    if block_size == 20:
        assert sum(packing.fit(p, rs, block_size)[2] for p, rs in groups) > 0  # the cut is exercised
    p = packing.pack(groups, block_size)
    x, mask = padded(groups, block_size)
    with torch.no_grad():
        for average in (False, True):
            packed = response_logps(model, p, average)
            alone = vcb.sequence_logps(model(x), x, mask, average)
            torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
        real = torch.arange(x.size(1))[None] < torch.tensor([len(prompt) + len(r) for prompt, rs in
                                                             (packing.fit(q, qs, block_size)[:2] for q, qs in groups)
                                                             for r in rs])[:, None]
        scores = model(p, head="reward")
        torch.testing.assert_close(scores, model.reward(x, real), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,lengths", [(1, (1, 5)), (3, (1, 14)), (8, (1, 40))])
def test_prefix_shared_attention_equals_the_dense_masked_rows(n, lengths):
    """The packed layout's attention (each response sees its prompt and itself, responses bucketed
    by length) against the dense rows it replaces, masked to let each token see the same: the same
    hidden states and the same gradients."""
    model = sharp_gpt(5, block_size=128).train()
    p = packing.pack(groups_of(6, 5, n, response_len=lengths), 128)
    assert n == 1 or len(p.buckets) > 1  # responses of several lengths: several buckets
    idx, pos, mask, where = p.dense()
    packed = model.hidden_packed(p)
    dense = model.hidden(idx, pos, mask).flatten(0, 1).index_select(0, where)
    torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-5)
    weights = list(model.parameters())
    g_packed = torch.autograd.grad((packed * torch.linspace(-1, 1, packed.numel()).view_as(packed)).sum(), weights)
    g_dense = torch.autograd.grad((dense * torch.linspace(-1, 1, dense.numel()).view_as(dense)).sum(), weights)
    for a, b in zip(g_packed, g_dense):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fit_keeps_the_end_of_text_first_and_cuts_prompts_from_the_left_and_responses_from_the_right():
    prompt, responses = [EOT, 1, 2, 3, 4, 5, 6], [[7, 8, EOT], [9] * 12 + [EOT]]
    cut_prompt, cut_responses, n = packing.fit(prompt, responses, 10)
    assert cut_prompt == [EOT, 6] and cut_responses == [[7, 8, EOT], [9] * 8] and n == 2
    assert packing.fit(prompt, responses[:1], 10) == (prompt, responses[:1], 0)


# ---- 2. the sampler's log-probs are the scorer's

def test_the_sampler_returns_the_log_probs_the_scorer_gives_the_same_tokens():
    """The KL estimate is the mean of logp_pi - logp_sft, logp_pi from the sampler, logp_sft from the
    scorer: both must be the same function of the tokens."""
    model = sharp_gpt(2, block_size=64)
    cfg = config.parse_args(["--device=cpu", "--block_size=64", "--max_new_tokens=20", "--eval_batch=7"])
    env = runtime.setup(cfg)
    prompts = [g[0] for g in groups_of(1, 5, 1, prompt_len=(1, 30))]
    kw = dict(temperature=1.0, num_samples=3, return_logps=True)
    free, _ = model.generate(prompts, 20, generator=torch.Generator().manual_seed(0), **kw)
    stop = max(set(free[0]), key=sum(free, []).count)  # a token it samples often: rows end at different steps
    outs, logps = model.generate(prompts, 20, stop_token=stop, generator=torch.Generator().manual_seed(0), **kw)
    assert len({len(o) for o in outs}) > 2 and any(o[-1] == stop for o in outs)
    groups = [(prompts[i], outs[3 * i:3 * i + 3]) for i in range(len(prompts))]
    scored = evaluate.score_logps(cfg, env, model, ENC, groups)
    torch.testing.assert_close(torch.tensor(logps), torch.tensor(scored), atol=1e-4, rtol=1e-5)


# ---- 3. the align step computes vcb.py's losses

def candidates(seed, B=5, n=4, ties=True):
    """Scored candidates with random reference log-probs and rewards (one prompt tied when ties)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, n, generator=g)
    if ties:
        rewards[0] = 0.5  # sigma 0: skipped by VCB, no pair for the order-based methods
    ref = -20 * torch.rand(B, n, generator=g) - 5
    return runtime.Candidates(groups_of(seed, B, n), ref, rewards)


@pytest.mark.parametrize("method,sigma", [("vcb", "prompt"), ("vcb", "global"), ("dpo", "prompt"), ("ipo", "prompt"),
                                          ("slic", "prompt"), ("rrhf", "prompt"), ("rebel", "prompt"), ("infonca", "prompt"),
                                          ("odpo", "prompt")])
def test_the_align_step_loss_is_the_pure_loss_on_padded_log_probs(method, sigma):
    cfg = config.parse_args(["--device=cpu", "--block_size=64", "--beta=0.5", "--lam=0.3", f"--vcb_sigma={sigma}"])
    env = runtime.setup(cfg)
    cands, idx = candidates(3), [3, 0, 4]
    model = sharp_gpt(4, block_size=64)
    spread = vcb.reward_sigma(cands.rewards.flatten()[None])  # the set's, not the micro-batch's
    loss, metrics = train.align_loss(cfg, env, ENC, model, cands, method, idx, methods.reward_spread(cands.rewards))
    x, mask = padded([cands.groups[i] for i in idx], 64)
    logps = vcb.sequence_logps(model(x), x, mask, average=method == "rrhf").view(len(idx), 4)
    ref, rewards = cands.ref_logps[idx], cands.rewards[idx]
    want = {"vcb": lambda: vcb.vcb_loss(logps, ref, rewards, 0.5, 0.3, sigma=spread if sigma == "global" else None,
                                        reduction="sum"),
            "rrhf": lambda: vcb.rrhf_loss(logps, rewards, reduction="sum"),
            "rebel": lambda: vcb.rebel_loss(logps, ref, rewards, 1 / (0.5 * spread), reduction="sum"),
            "infonca": lambda: vcb.infonca_loss(logps, ref, rewards, 0.5, spread, reduction="sum"),
            "odpo": lambda: vcb.odpo_pairwise_loss(logps, ref, rewards, 0.5, spread, reduction="sum")}.get(
        method, lambda: vcb.pairwise_loss(methods.PAIR_LOSSES[method], logps, ref, rewards, 0.5, reduction="sum"))()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert loss.requires_grad and loss.item() != 0
    assert methods.loss_count(cfg, method, rewards) == {"vcb": 2, "rrhf": 3, "infonca": 3, "rebel": 3 * 6}.get(method, 2 * 6)
    if method == "vcb":
        assert metrics["skipped"] == pytest.approx(1 / 3)


def test_reward_sigma_is_the_population_standard_deviation_and_global_is_one_for_the_set():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(vcb.reward_sigma(rewards), torch.tensor([1.25 ** 0.5, (3 / 16) ** 0.5]))
    everything = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 1.0])
    mean = everything.mean()
    torch.testing.assert_close(methods.reward_spread(rewards), ((everything - mean) ** 2).mean().sqrt()[None])
    # with one sigma s, each target gap is (r_i - r_j) / (beta s); at lam = 0 the loss is the mean squared error
    policy, ref, s = torch.tensor([[0.0, 1.0, -1.0, 2.0]]), torch.zeros(1, 4), 2.0
    i, j = torch.triu_indices(4, 4, 1)
    d = policy[0]
    want = (((d[i] - d[j]) - (rewards[0, i] - rewards[0, j]) / (0.5 * s)) ** 2).mean()
    torch.testing.assert_close(vcb.vcb_loss(policy, ref, rewards[:1], 0.5, 0.0, sigma=torch.tensor([s])), want)


# ---- 4. training moves what it should

def curve(out, task):
    return [r for r in records.read_curves(out / "curves.jsonl") if r["task"] == task]


def align_in(out, method, *args, size=TINY):
    """Train one policy in a run's folder (of that size) with extra options; returns its curve."""
    cfg = config.parse_args([f"--out_dir={out}", *size, f"--methods={method}", "--force", *args])
    env = runtime.setup(cfg)
    enc = runtime.load_tokenizer(cfg)
    task = train.align_task(cfg, method, 0, f"align-{method}", str(out / f"policy_{method}.pt"))
    train.align(cfg, env, enc, runtime.load_candidates(cfg, env, enc), method, 0, task)
    return curve(out, f"align-{method}")


@pytest.mark.slow
def test_vcb_learns_the_target_gaps_and_dpo_its_margin(tiny_copy):
    vcb_curve = align_in(tiny_copy, "vcb", "--align_steps=40", "--align_lr=3e-3", "--lam=0")
    first, last = vcb_curve[0]["gap_corr"], sum(r["gap_corr"] or 0.0 for r in vcb_curve[-5:]) / 5  # None: no gaps yet
    assert (first is None or abs(first) < 0.3) and last > 0.9, (first, last)  # from no learned gaps (None) to calibrated
    dpo_curve = align_in(tiny_copy, "dpo", "--align_steps=40", "--align_lr=3e-3")
    assert dpo_curve[0]["margin"] == pytest.approx(0.0, abs=0.05)  # the policy starts at the reference
    assert sum(r["margin"] for r in dpo_curve[-5:]) / 5 > 1.0 and dpo_curve[-1]["acc"] > 0.8


@pytest.mark.slow
def test_ppo_raises_the_reward_models_score(small_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(small_run, out)
    ppo_curve = align_in(out, "ppo", "--online_iters=12", "--online_prompts=16", "--online_k=4", "--beta=0.03",
                         "--online_lr=1e-3", size=SMALL)
    early, late = [sum(r["score"] for r in part) / len(part) for part in (ppo_curve[:3], ppo_curve[-3:])]
    spread = torch.tensor([r["rewards"] for r in data.read_jsonl(out / "candidates.jsonl")]).std().item()
    assert late > early + spread / 2, (early, late, spread)  # half the SFT candidates' spread of RM scores, in 12 iterations
