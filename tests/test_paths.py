"""The path every results table depends on, checked on the CPU: the packed layout gives what the plain
padded rows give, and those what each sequence gives alone (values and gradients); the sampler's
log-probs are the scorer's; the align step computes the losses of vcb.py; and a few steps of
training move what they should."""
import shutil

import pytest
import torch

import data
import evaluate
import packing
import train
import vcb
from conftest import SMALL, TINY, sharp_gpt
from machinery import config, files, records, runtime


ENC = data.byte_tokenizer()
EOT = ENC.eot_token


def groups_of(seed, n_groups, n, prompt_len=(3, 12), response_len=(1, 14)):
    """Random prompt groups as data.encode_group gives them: (<|endoftext|> + prompt, [response +
    <|endoftext|>, ...]), of random lengths."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    tokens = lambda k: torch.randint(0, 256, (k,), generator=g).tolist()  # noqa: E731
    return [([EOT] + tokens(rand(*prompt_len)), [tokens(rand(*response_len)) + [EOT] for _ in range(n)])
            for _ in range(n_groups)]


def alone(model, groups, block_size, average=False):
    """Each response's log-prob and reward-model score, its sequence read alone (no batch, no padding)
    with the plain forward and the heads at hand: the reference both layouts must reproduce."""
    logps, scores = [], []
    for prompt, responses in groups:
        prompt, responses, _ = data.fit(prompt, responses, block_size)
        for r in responses:
            x = torch.tensor([prompt + r])
            logits = model.logits(model(x))[0].double().log_softmax(-1)        # (T, V)
            token = [logits[len(prompt) - 1 + j, t] for j, t in enumerate(r)]  # token t is predicted at t - 1
            logps.append(sum(token) / (len(r) if average else 1))
            if model.reward_head is not None:
                scores.append(model.score(model(x))[0, -1])
    return torch.stack(logps).float(), torch.stack(scores) if scores else None


# ---- 1. both layouts equal each sequence read alone

@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("block_size", [64, 20])  # 20: prompts cut from the left, long responses from the right
def test_log_probs_and_rewards_equal_each_sequence_alone(layout, block_size):
    """Whatever the layout: the padding and the batch companions change nothing, each token is read
    where the token before it stands, and a length average divides by the response's tokens."""
    model = sharp_gpt(1, block_size=block_size, reward_head=True)
    groups = groups_of(0, 4, 3)
    if block_size == 20:
        assert sum(data.fit(p, rs, block_size)[2] for p, rs in groups) > 0  # the cut is exercised
    batch, reader = packing.batch_of(groups, block_size, layout), packing.Reader(model)
    with torch.no_grad():
        for average in (False, True):
            want, scores = alone(model, groups, block_size, average)
            torch.testing.assert_close(packing.response_logps(reader, batch, average), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reader(batch, head="reward"), scores, atol=1e-5, rtol=1e-5)


def test_the_packed_layout_gives_the_plain_forms_values_and_gradients():
    """packing.pack is a drop-in for packing.pad: the same log-probs, scores and critic values, and the
    same gradients of a loss on them, for every weight."""
    model = sharp_gpt(7, block_size=128, reward_head=True).train()
    groups, reader = groups_of(8, 5, 4, response_len=(1, 30)), packing.Reader(model)
    weights = list(model.parameters())
    out = {}
    for layout in ("packed", "padded"):
        batch = packing.batch_of(groups, 128, layout)
        logps, scores, values = packing.response_logps(reader, batch), reader(batch, "reward"), reader(batch, "value")
        loss = (logps * torch.linspace(-1, 1, len(logps))).sum() + scores.sum() + (values ** 2).mean()
        out[layout] = (logps, scores, values, torch.autograd.grad(loss, weights))
    for a, b in zip(out["packed"][:3], out["padded"][:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(out["packed"][3], out["padded"][3]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,lengths", [(1, (1, 5)), (3, (1, 14)), (8, (1, 40))])
def test_prefix_shared_attention_equals_the_dense_masked_rows(n, lengths):
    """The packed layout's attention (each response sees its prompt and itself, responses bucketed
    by length) against the dense rows it replaces, masked to let each token see the same: the same
    hidden states and the same gradients."""
    model = sharp_gpt(5, block_size=128).train()
    p = packing.pack(groups_of(6, 5, n, response_len=lengths), 128)
    assert n == 1 or len(p.buckets) > 1  # responses of several lengths: several buckets
    idx, pos, mask, where = p.dense()
    packed = packing.packed_hidden(model, p)
    dense = model(idx, pos, mask).flatten(0, 1).index_select(0, where)
    torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-5)
    weights = list(model.parameters())
    g_packed = torch.autograd.grad((packed * torch.linspace(-1, 1, packed.numel()).view_as(packed)).sum(), weights)
    g_dense = torch.autograd.grad((dense * torch.linspace(-1, 1, dense.numel()).view_as(dense)).sum(), weights)
    for a, b in zip(g_packed, g_dense):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fit_keeps_the_end_of_text_first_and_cuts_prompts_from_the_left_and_responses_from_the_right():
    prompt, responses = [EOT, 1, 2, 3, 4, 5, 6], [[7, 8, EOT], [9] * 12 + [EOT]]
    cut_prompt, cut_responses, n = data.fit(prompt, responses, 10)
    assert cut_prompt == [EOT, 6] and cut_responses == [[7, 8, EOT], [9] * 8] and n == 2
    assert data.fit(prompt, responses[:1], 10) == (prompt, responses[:1], 0)


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
    scored = evaluate.score_logps(cfg, env, model, groups)
    torch.testing.assert_close(torch.tensor(logps), torch.tensor(scored), atol=1e-4, rtol=1e-5)


# ---- 3. the align step computes vcb.py's losses

def candidates(seed, B=5, n=4, ties=True):
    """Scored candidates with random reference log-probs and rewards (one prompt tied when ties)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, n, generator=g)
    if ties:
        rewards[0] = 0.5  # sigma 0: skipped by VCB, no pair for the order-based methods
    ref = -20 * torch.rand(B, n, generator=g) - 5
    return data.Candidates(groups_of(seed, B, n), ref, rewards)


@pytest.mark.parametrize("method,sigma", [("vcb", "prompt"), ("vcb", "global"), ("dpo", "prompt"), ("ipo", "prompt"),
                                          ("slic", "prompt"), ("rrhf", "prompt"), ("rebel", "prompt"), ("infonca", "prompt"),
                                          ("odpo", "prompt")])
def test_the_align_step_loss_is_the_pure_loss_on_each_sequence_alone(method, sigma):
    cfg = config.parse_args(["--device=cpu", "--block_size=64", "--beta=0.5", "--lam=0.3", f"--vcb_sigma={sigma}"])
    env = runtime.setup(cfg)
    cands, idx = candidates(3), [3, 0, 4]
    model = sharp_gpt(4, block_size=64)
    spread = vcb.reward_sigma(cands.rewards.flatten()[None])  # the set's, not the micro-batch's
    m = vcb.METHODS[method]
    scale = spread if m.sigma == "set" or sigma == "global" else None
    loss, metrics = train.align_loss(cfg, env, packing.Reader(model), cands, m, idx, scale)
    logps = alone(model, [cands.groups[i] for i in idx], 64, average=method == "rrhf")[0].view(len(idx), 4)
    ref, rewards = cands.ref_logps[idx], cands.rewards[idx]
    want = {"vcb": lambda: vcb.vcb_loss(logps, ref, rewards, 0.5, 0.3, sigma=spread if sigma == "global" else None,
                                        reduction="sum"),
            "rrhf": lambda: vcb.rrhf_loss(logps, rewards, reduction="sum"),
            "rebel": lambda: vcb.rebel_loss(logps, ref, rewards, 1 / (0.5 * spread), reduction="sum"),
            "infonca": lambda: vcb.infonca_loss(logps, ref, rewards, 0.5, spread, reduction="sum"),
            "odpo": lambda: vcb.odpo_pairwise_loss(logps, ref, rewards, 0.5, spread, reduction="sum")}.get(
        method, lambda: vcb.pairwise_loss(getattr(vcb, f"{method}_loss"), logps, ref, rewards, 0.5, reduction="sum"))()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert loss.requires_grad and loss.item() != 0
    assert m.count(rewards, cfg.sigma_floor) == {"vcb": 2, "rrhf": 3, "infonca": 3, "rebel": 3 * 6}.get(method, 2 * 6)
    if method == "vcb":
        assert metrics["skipped"] == pytest.approx(1 / 3)


def test_reward_sigma_is_the_population_standard_deviation_and_global_is_one_for_the_set():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(vcb.reward_sigma(rewards), torch.tensor([1.25 ** 0.5, (3 / 16) ** 0.5]))
    everything = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 1.0])
    mean = everything.mean()
    torch.testing.assert_close(vcb.reward_sigma(rewards.flatten()[None]), ((everything - mean) ** 2).mean().sqrt()[None])
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
    enc = train.tokenizer(cfg)
    task = train.align_task(cfg, method, 0, f"align-{method}", str(out / f"policy_{method}.pt"))
    train.align(cfg, env, enc, train.candidates(cfg, env, enc), method, 0, task)
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
    spread = torch.tensor([r["rewards"] for r in files.read_jsonl(out / "candidates.jsonl")]).std().item()
    assert late > early + spread / 2, (early, late, spread)  # half the SFT candidates' spread of RM scores, in 12 iterations
