"""
vcb.py: the Value-based Calibration loss, the order-based baselines, PPO's and RLOO's losses, the
closed-form theory, and the registry of methods (METHODS), where each method is declared once.

VCB is the method of Mao et al., "Don't Forget Your Reward Values" (EMNLP 2024, arXiv 2402.16030).
The paper's code is not public and its body was not available here: the loss is reconstructed from
its abstract and a public walk-through, and where they are silent this project chose (docs/method.md
says which is which). Each loss is one pure function of per-sequence log-probabilities (float32),
named after the paper:

    delta(y)  = logp_pi(y|x) - logp_sft(y|x)                 how far training moved response y
    VCB       l_ij = ([delta_i - delta_j] - (r_i - r_j) / (beta * sigma(x)))^2   (difference method)
              L(x) = (1/lam) log mean_{i<j} exp(lam * l_ij)                       (LogSumExp over pairs)
    DPO       -log sigmoid(beta * h),  h = delta(y_w) - delta(y_l)
    IPO       (h - 1/(2 beta))^2
    SLiC      max(0, 1 - beta * h)
    RRHF      sum_{r_i < r_j} max(0, p_i - p_j) - p_best     (p: length-averaged log-prob under pi)
    BT        -log sigmoid(r(x, y_w) - r(x, y_l))            (the reward model's Bradley-Terry loss)
    REBEL     ((delta_i - delta_j) - eta (r_i - r_j))^2       (value-aware: one scale eta for every prompt)
    InfoNCA   -sum_i softmax(r / alpha)_i log softmax(beta delta)_i
    ODPO      -log sigmoid(beta * h - offset),  offset = alpha log((r_w - r_l) / scale)     (DPO with an offset)
    PPO       per-token rewards, GAE, whitening, the clipped policy and value losses (online)
    RLOO      leave-one-out advantages, REINFORCE (online)

The candidate-set losses take a `reduction` like PyTorch's losses: "mean" is the loss of
docs/method.md; "sum" is what training adds up over micro-batches before dividing by the whole
step's count (vcb_count, pair_count, or the number of prompts), so that the step's gradient is the
same mean whatever the number of micro-batches and processes. The log-probabilities come from
packing.response_logps: log p(y|x) summed over the response's tokens (RRHF: averaged), float32.

Run it to see the walk-through's Figure 1 as numbers (about a second on a CPU):

    python vcb.py
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


SIGMA_FLOOR = 1e-6  # a prompt whose candidates' rewards spread less than this has nothing to calibrate


def f32(x):
    """At least float32: bfloat16/float16 inputs are upcast, float64 (tests, theory) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# -----------------------------------------------------------------------------
# VCB (docs/method.md, "VCB: the difference method keeps the reward")

def all_pairs(x):
    """x (B, n) -> (x_i - x_j) (B, n(n-1)/2) over every unordered pair i < j."""
    i, j = torch.triu_indices(x.size(-1), x.size(-1), offset=1, device=x.device)
    return x[:, i] - x[:, j]


def reward_sigma(rewards):
    """sigma(x): population standard deviation of each prompt's n candidate rewards. (B, n) -> (B,)."""
    return f32(rewards).std(dim=-1, unbiased=False)


def calibrated(rewards, sigma_floor=SIGMA_FLOOR):
    """(B,) True for the prompts whose candidates' rewards spread more than the floor: the others are
    equally good, have nothing to calibrate and give no loss."""
    return reward_sigma(rewards) > sigma_floor


def vcb_count(rewards, sigma_floor=SIGMA_FLOOR):
    """How many prompts VCB's mean is over: the calibrated ones. rewards (B, n) -> int."""
    return int(calibrated(rewards, sigma_floor).sum())


def vcb_pair_terms(policy_logps, ref_logps, rewards, beta, sigma_floor=SIGMA_FLOOR, sigma=None):
    """The per-pair squared errors l_ij of the difference method, for every unordered pair i < j.

    policy_logps, ref_logps, rewards: (B, n). Returns (l, learned_gap, target_gap, calibrated):
    l, learned_gap, target_gap are (B, n(n-1)/2), with
        learned_gap = delta_i - delta_j                    (log Z(x) has cancelled out of it)
        target_gap  = (r_i - r_j) / (beta * sigma(x))      (the optimum's gap, up to sigma)
    and calibrated (B,) is False for prompts whose sigma(x) <= sigma_floor (no loss from them).
    sigma (B,) or a scalar, optional: a spread to use in place of each prompt's own (--vcb_sigma=global:
    one for the whole candidate set); prompts whose own spread is under the floor are skipped all the same.
    """
    delta = f32(policy_logps) - f32(ref_logps)                     # (B, n)
    r = f32(rewards.detach())                                      # the reward model is not trained here
    own = reward_sigma(r)                                          # (B,)
    ok = own > sigma_floor
    sigma = own if sigma is None else f32(torch.as_tensor(sigma, device=r.device)).expand_as(own)
    sigma = torch.where(ok, sigma, torch.ones_like(sigma))         # no 0/0 for skipped prompts
    learned_gap = all_pairs(delta)                                 # (B, P)
    target_gap = all_pairs(r) / (beta * sigma[:, None])            # (B, P)
    return (learned_gap - target_gap) ** 2, learned_gap, target_gap, ok


def vcb_prompt_losses(policy_logps, ref_logps, rewards, beta, lam, sigma_floor=SIGMA_FLOOR, sigma=None):
    """L(x) for each prompt: (B,) losses and the (B,) calibrated mask.

    L(x) = (1/lam) * log(mean_{i<j} exp(lam * l_ij)), which moves the weight onto the pairs whose gap
    is most wrong as lam grows; lam = 0 is exactly the mean over pairs (its limit). Prompts that are
    not calibrated get loss 0.
    """
    l, _, _, ok = vcb_pair_terms(policy_logps, ref_logps, rewards, beta, sigma_floor, sigma)
    if lam == 0:
        per_prompt = l.mean(-1)
    else:
        # The same value, written so that it stays exact for every lam: with m the largest l_ij,
        #   L(x) = m + (1/lam) log(1 + mean(expm1(lam (l_ij - m)))).
        # The naive (logsumexp(lam l) - log P) / lam subtracts two nearly equal numbers and divides
        # the rounding error by lam (at lam = 1e-7 in float32 it is off by units); here every term is
        # small and exact, and the mean of expm1 stays above -1 because the largest pair gives 0.
        # m carries no gradient: L(x) does not depend on it.
        m = l.detach().max(dim=-1, keepdim=True).values           # (B, 1)
        per_prompt = m.squeeze(-1) + torch.log1p(torch.expm1(lam * (l - m)).mean(-1)) / lam
    return torch.where(ok, per_prompt, torch.zeros_like(per_prompt)), ok


def vcb_loss(policy_logps, ref_logps, rewards, beta, lam, sigma_floor=SIGMA_FLOOR, sigma=None, reduction="mean"):
    """The VCB loss of B prompts with n scored candidates each (B, n); policy_logps carries the gradient.

    reduction "mean": the mean of L(x) over the calibrated prompts (0, still attached to the graph,
    when every prompt is skipped); "sum": their sum (training divides it by the step's vcb_count);
    "none": L(x) per prompt (B,), 0 for the skipped ones.
    """
    per_prompt, ok = vcb_prompt_losses(policy_logps, ref_logps, rewards, beta, lam, sigma_floor, sigma)
    return reduce(per_prompt, reduction, ok.sum())


def reduce(losses, reduction, count):
    """losses as a mean over `count` items, their sum, or as they are ("none")."""
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / max(int(count), 1)


@torch.no_grad()
def vcb_diagnostics(policy_logps, ref_logps, rewards, beta, sigma_floor=SIGMA_FLOOR, sigma=None):
    """What to watch during VCB training: the fraction of prompts skipped for sigma(x) under the floor,
    and the Pearson correlation between learned gaps delta_i - delta_j and target gaps (r_i - r_j) /
    (beta sigma) over the calibrated prompts' pairs (1.0 when the policy is perfectly calibrated;
    NaN while every learned gap is 0). 0-dim tensors."""
    _, learned, target, ok = vcb_pair_terms(policy_logps, ref_logps, rewards, beta, sigma_floor, sigma)
    w = ok[:, None].expand_as(learned).float()                     # the calibrated prompts' pairs
    a, b = (learned - masked_mean(learned, w)) * w, (target - masked_mean(target, w)) * w
    denom = a.norm() * b.norm()
    corr = torch.where(denom > 0, (a * b).sum() / denom, torch.full_like(denom, float("nan")))
    return {"gap_corr": corr, "skipped": 1.0 - ok.float().mean()}  # tensors: read when logged


# -----------------------------------------------------------------------------
# order-based baselines: per-pair losses with the DPO reference code's signature

def margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """h = delta(y_w) - delta(y_l): how much more training moved the winner than the loser. (P,)"""
    return (f32(policy_chosen_logps) - f32(ref_chosen_logps)) - (f32(policy_rejected_logps) - f32(ref_rejected_logps))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h). ln 2 at h = 0. Returns (P,)."""
    h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """IPO (Azar et al. 2023, eq. 17, their tau is our beta): (h - 1/(2 beta))^2, minimal at
    h = 1/(2 beta): a finite target gap, where DPO's keeps growing. Returns (P,)."""
    h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1 / (2 * beta)) ** 2


def slic_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """SLiC, hinge form with the reference log-ratio (Zhao et al. 2023; docs/method.md):
    max(0, 1 - beta * h), zero once beta * h >= 1. Returns (P,)."""
    h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return F.relu(1 - beta * h)


def rrhf_loss(policy_avg_logps, rewards, nll_weight=1.0, reduction="mean"):
    """RRHF (Yuan et al. 2023, eqs. 2-4), in its own form: no reference model, length-averaged
    log-probs p_i (B, n). Rank term: sum over pairs with r_i < r_j of max(0, p_i - p_j), zero exactly
    when every better response is at least as likely. Plus nll_weight times the token-averaged NLL
    of the best response, -p_best. reduction: "mean" over the B prompts, "sum", or "none" (B,)."""
    p, r = f32(policy_avg_logps), f32(rewards)
    worse = r[:, :, None] < r[:, None, :]                          # (B, n, n): r_i < r_j
    rank = (F.relu(p[:, :, None] - p[:, None, :]) * worse).sum((1, 2))
    best = r.argmax(-1)
    nll = -p.gather(1, best[:, None]).squeeze(1)
    return reduce(rank + nll_weight * nll, reduction, len(p))


def preference_pairs(rewards):
    """Every ordered (winner, loser) pair of each prompt's candidates, from the rewards' order alone.
    rewards (B, n) -> index tensors (prompt, winner, loser), each (P,). Tied rewards give no pair."""
    wins = rewards[:, :, None] > rewards[:, None, :]               # (B, n, n): candidate w beats l
    b, w, l = wins.nonzero(as_tuple=True)
    return b, w, l


def pair_count(rewards):
    """How many ordered pairs the order-based losses average over: rewards (B, n) -> int."""
    return int((rewards[:, :, None] > rewards[:, None, :]).sum())


def pairwise_loss(loss_fn, policy_logps, ref_logps, rewards, beta, reduction="mean"):
    """An order-based per-pair loss (dpo_loss, ipo_loss, slic_loss) on every ordered pair of B prompts'
    n candidates (B, n): the mean over the pairs (0 if there are none), their sum, or each ("none")."""
    b, w, l = preference_pairs(rewards)
    losses = loss_fn(policy_logps[b, w], policy_logps[b, l], ref_logps[b, w], ref_logps[b, l], beta)
    return reduce(losses, reduction, len(losses))


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """The reward model's loss (Bradley and Terry 1952; docs/method.md, "The pipeline"), per pair:
    -log sigmoid(r(x, y_w) - r(x, y_l)). (P,) -> (P,)."""
    return -F.logsigmoid(f32(chosen_rewards) - f32(rejected_rewards))


# -----------------------------------------------------------------------------
# value-aware peers of VCB: they use the rewards' size too (docs/method.md, "The value-aware peers")

def rebel_loss(policy_logps, ref_logps, rewards, eta, reduction="mean"):
    """Offline REBEL (Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards",
    arXiv 2404.16767, eq. 2), with the frozen reference in place of REBEL's previous iterate: regress
    the gap of log-ratios onto the reward gap, one scale eta for every prompt,
        l_ij = ((delta_i - delta_j) - eta (r_i - r_j))^2      over every unordered pair i < j:
    VCB's pair term without the per-prompt sigma and without the LogSumExp. eta: a number, or (B,)
    one per prompt. (B, n) -> the mean over all pairs ("sum", or "none": (B, n(n-1)/2))."""
    eta = f32(torch.as_tensor(eta, device=rewards.device)).reshape(-1, 1)
    delta = f32(policy_logps) - f32(ref_logps)
    losses = (all_pairs(delta) - eta * all_pairs(f32(rewards.detach()))) ** 2
    return reduce(losses, reduction, losses.numel())


def infonca_loss(policy_logps, ref_logps, rewards, beta, alpha, reduction="mean"):
    """InfoNCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv 2402.05369, eq. 5): the cross-entropy between the target softmax(r / alpha)
    over a prompt's n candidates and the model's softmax(beta * delta) over the same candidates,
        L(x) = -sum_i softmax(r / alpha)_i log softmax(beta delta)_i.
    On the candidates its optimum is beta delta_i = r_i / alpha + c: VCB's, with alpha = sigma(x).
    alpha: a number, or (B,) one per prompt. (B, n) -> the mean over prompts ("sum", "none": (B,))."""
    alpha = f32(torch.as_tensor(alpha, device=rewards.device)).reshape(-1, 1)
    target = torch.softmax(f32(rewards.detach()) / alpha, dim=-1)
    model = torch.log_softmax(beta * (f32(policy_logps) - f32(ref_logps)), dim=-1)
    return reduce(-(target * model).sum(-1), reduction, len(target))


def odpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, offset):
    """ODPO (Amini et al. 2024, "Direct Preference Optimization with an Offset", arXiv 2402.10571,
    eq. 9): -log sigmoid(beta h - offset), the margin must exceed an offset (P,) that grows with the
    reward gap (ODPO's alpha log(r_w - r_l)). A zero offset is DPO. Returns (P,)."""
    h = margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h - f32(offset))


def odpo_pairwise_loss(policy_logps, ref_logps, rewards, beta, scale, alpha=1.0, reduction="mean"):
    """ODPO on every ordered pair of B prompts' n candidates (B, n), each with its offset
    alpha log((r_w - r_l) / scale): the reward gap in units of scale (the set's spread of rewards),
    so that the offset has no unit; a pair that barely differs gets a large negative offset and asks
    for little. The mean over the pairs (0 if there are none), their sum, or each ("none")."""
    b, w, l = preference_pairs(rewards)
    offset = alpha * torch.log((f32(rewards[b, w]) - f32(rewards[b, l])) / f32(torch.as_tensor(scale)).to(rewards.device))
    losses = odpo_loss(policy_logps[b, w], policy_logps[b, l], ref_logps[b, w], ref_logps[b, l], beta, offset.reshape(-1))
    return reduce(losses, reduction, len(losses))


# -----------------------------------------------------------------------------
# online baselines: PPO and RLOO (docs/method.md, "PPO and RLOO"). Per-token tensors are (B, T): B sampled responses, right-
# padded, mask (B, T) True on each response's tokens (its <|endoftext|> included: stopping is an action).

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_token_rewards(logp_pi, logp_ref, scores, mask, beta):
    """The per-token reward of RLHF's PPO (Ziegler et al. 2019; Stiennon et al. 2020, eq. 2):
        r_t = -beta * (log pi(y_t | .) - log pi_sft(y_t | .))      at every response token (the k1 KL estimate),
    plus the sequence's score at its last token. logp_pi, logp_ref (B, T); scores (B,). Returns (B, T),
    zero outside the mask."""
    rewards = -beta * (f32(logp_pi) - f32(logp_ref)) * mask
    last = mask.long().sum(-1) - 1                                   # (B,) each response's last token
    return rewards.index_put((torch.arange(len(last), device=last.device), last), f32(scores), accumulate=True)


def gae(rewards, values, mask, gamma, gae_lambda):
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16), per response:
        td_t = r_t + gamma * V_{t+1} - V_t               (V after the last token is 0: the episode ends),
        A_t = sum_l (gamma gae_lambda)^l td_{t+l},    returns R_t = A_t + V_t (the value's target).
    rewards, values, mask (B, T). Returns (advantages, returns), each (B, T), zero outside the mask."""
    rewards, values = f32(rewards) * mask, f32(values) * mask
    advantages, next_value, next_adv = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):                      # T is a response's length: a short loop
        td = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (td + gamma * gae_lambda * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the masked entries (PPO's advantage whitening): the same result for any
    positive scale and shift of x. shift_mean=False keeps the mean (a reward's sign)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, clip):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss over the response tokens:
        ratio = exp(logp - old_logp),   L = mean_t max(-A_t ratio, -A_t clip(ratio, 1 - clip, 1 + clip)).
    Returns (loss, stats): the share of clipped tokens, the approximate KL 0.5 (logp - old)^2 and the
    mean ratio; on the first minibatch, before any update, the ratio is exactly 1."""
    diff = f32(logp) - f32(old_logp)
    ratio = torch.exp(diff)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():  # tensors: reading them waits for the device, so the caller reads them when it logs
        stats = {"clipfrac": masked_mean(((ratio - 1).abs() > clip).float(), mask),
                 "approx_kl": masked_mean(0.5 * diff ** 2, mask), "ratio": masked_mean(ratio, mask)}
    return masked_mean(losses, mask), stats


def ppo_value_loss(values, old_values, returns, mask, clip):
    """The clipped value loss of the PPO-for-LM references (docs/method.md, "PPO and RLOO"):
        0.5 * mean_t max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2)."""
    clipped = old_values + (f32(values) - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def adaptive_beta(beta, kl, target, n, horizon):
    """The adaptive KL controller of Ziegler et al. 2019 (sec. 2.2), as lm-human-preferences runs it:
        beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon,
    n the rollouts just seen: beta grows while the KL is above its target and shrinks below it."""
    return beta * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)


def rloo_advantages(scores, kl, beta):
    """RLOO (Ahmadian et al. 2024, eq. 4): the whole response is one action with reward
    R_i = score_i - beta * sum_t k1_t, and the baseline of sample i is the mean reward of the other
    k - 1 samples of its prompt: A_i = R_i - mean_{j != i} R_j. scores, kl (P, k) -> (P, k)."""
    R = f32(scores) - beta * f32(kl)
    k = R.size(-1)
    return R - (R.sum(-1, keepdim=True) - R) / (k - 1)


def reinforce_loss(seq_logps, advantages):
    """REINFORCE (Williams 1992): -A * log pi(y|x), mean over responses; A carries no gradient."""
    return -(advantages.detach() * f32(seq_logps)).mean()


# -----------------------------------------------------------------------------
# the theory: the KL-regularised optimum on a finite candidate set

def optimal_policy(ref_logps, rewards, beta, sigma_floor=SIGMA_FLOOR):
    """log pi*(y|x) over each prompt's n candidates: the optimum of E[r] - beta KL(pi || pi_sft)
    restricted to the set, with VCB's sigma normalisation (docs/method.md, "The objective and its optimum"):

        log pi*(y_i) = log pi_sft(y_i) + r_i / (beta sigma(x)) - log Z(x),  Z(x) summed over the n.

    Its gaps are exactly VCB's targets, so VCB's loss is 0 there. ref_logps, rewards: (B, n) -> (B, n).
    A prompt with sigma(x) under the floor keeps the reference distribution (renormalised on the set).
    """
    r = f32(rewards)
    sigma = reward_sigma(r)
    scale = torch.where(sigma > sigma_floor, 1 / (beta * sigma.clamp(min=sigma_floor)), torch.zeros_like(sigma))
    return torch.log_softmax(f32(ref_logps) + r * scale[:, None], dim=-1)


# -----------------------------------------------------------------------------
# the methods, each declared once: what the pipeline, the experiments and the report know of each.
# Adding a loss is its function above, one entry here, its tests and its row in docs/method.md.

@dataclass(frozen=True)
class Method:
    label: str                   # its name in figures
    color: str                   # its colour in every figure
    loss: Callable = None        # offline: loss(logps, ref_logps, rewards, beta, lam, sigma, sigma_floor), summed over the prompts
    count: Callable = None       # what that sum is a mean over: count(rewards, sigma_floor) -> int (pairs, prompts, ...)
    beta: bool = True            # has a KL strength beta
    reference: bool = True       # reads the reference log-probs (logp_sft)
    length_averaged: bool = False  # log-probs averaged over the response's tokens, not summed
    sigma: str = ""              # uses the rewards' size, divided by each "prompt"'s sigma(x) or by the candidate "set"'s spread
    diagnostics: Callable = None  # extra metrics to watch: diagnostics(logps, ref_logps, rewards, beta, sigma, sigma_floor) -> dict
    online: bool = False         # samples from the policy as it learns (ppo.py), instead of learning from the candidates
    critic: bool = False         # online with a value model (PPO), or with the other samples as baseline (RLOO)
    betas: tuple = (3.0, 1.0, 0.3)  # the sweep's betas, low KL to high: each method's beta moves the KL its own way

    @property
    def value_aware(self):       # uses the rewards' size, not only their order
        return bool(self.sigma)


# The offline losses, each on the batch's (b, n) log-probs, reference log-probs and rewards, summed
# over its prompts (training divides the sum by the step's count). sigma: the scale the value-aware
# losses divide reward gaps by, one for the candidate set, or None for each prompt's own sigma(x).

def vcb(logps, ref_logps, rewards, beta, lam, sigma, sigma_floor):
    return vcb_loss(logps, ref_logps, rewards, beta, lam, sigma_floor, sigma, reduction="sum")


def pairs_of(loss_fn):  # an order-based per-pair loss, on every ordered pair of a prompt's candidates
    return lambda logps, ref_logps, rewards, beta, lam, sigma, sigma_floor: \
        pairwise_loss(loss_fn, logps, ref_logps, rewards, beta, reduction="sum")


def rrhf(logps, ref_logps, rewards, beta, lam, sigma, sigma_floor):  # logps: length-averaged; no reference, no beta
    return rrhf_loss(logps, rewards, reduction="sum")


def rebel(logps, ref_logps, rewards, beta, lam, sigma, sigma_floor):
    return rebel_loss(logps, ref_logps, rewards, 1 / (beta * sigma), reduction="sum")


def infonca(logps, ref_logps, rewards, beta, lam, sigma, sigma_floor):
    return infonca_loss(logps, ref_logps, rewards, beta, sigma, reduction="sum")


def odpo(logps, ref_logps, rewards, beta, lam, sigma, sigma_floor):
    return odpo_pairwise_loss(logps, ref_logps, rewards, beta, sigma, reduction="sum")


# what each sum is a mean over: count(rewards (b, n), sigma_floor) -> int (VCB's: vcb_count)
def ordered_pairs(rewards, sigma_floor):
    return pair_count(rewards)


def unordered_pairs(rewards, sigma_floor):
    return len(rewards) * math.comb(rewards.size(1), 2)


def prompts(rewards, sigma_floor):
    return len(rewards)


def vcb_watch(logps, ref_logps, rewards, beta, sigma, sigma_floor):
    return vcb_diagnostics(logps, ref_logps, rewards, beta, sigma_floor, sigma)


METHODS = {
    "vcb": Method("VCB", "tab:orange", vcb, vcb_count, sigma="prompt", diagnostics=vcb_watch),
    "dpo": Method("DPO", "tab:green", pairs_of(dpo_loss), ordered_pairs, betas=(10.0, 3.0, 1.0)),
    "ipo": Method("IPO", "tab:blue", pairs_of(ipo_loss), ordered_pairs, betas=(1.0, 0.3, 0.1)),
    "slic": Method("SLiC", "tab:purple", pairs_of(slic_loss), ordered_pairs, betas=(10.0, 3.0, 1.0)),
    "rrhf": Method("RRHF", "tab:red", rrhf, prompts, beta=False, reference=False, length_averaged=True, betas=()),
    "ppo": Method("PPO", "tab:cyan", online=True, critic=True, betas=(0.3, 0.1, 0.03)),
    "rloo": Method("RLOO", "tab:olive", online=True, betas=(0.3, 0.1, 0.03)),
    # the value-aware peers, set so that their optimum on the candidates is VCB's with one sigma for the
    # set: delta_i - delta_j = (r_i - r_j) / (beta * sigma) (docs/method.md, "The value-aware peers")
    "rebel": Method("REBEL", "tab:pink", rebel, unordered_pairs, sigma="set"),
    "infonca": Method("InfoNCA", "tab:gray", infonca, prompts, sigma="set"),
    "odpo": Method("ODPO", "gold", odpo, ordered_pairs, sigma="set"),
}


# -----------------------------------------------------------------------------
# the walk-through's Figure 1, in numbers

def train_free_softmax(loss_fn, ref_logps, steps=500, lr=0.25):
    """Plain gradient descent on a free softmax over the candidates: one logit each, started at the
    reference. loss_fn(policy_logps (B, n)) -> scalar. Returns the trained log-probs (B, n)."""
    theta = f32(ref_logps).clone().requires_grad_(True)
    for _ in range(steps):
        grad, = torch.autograd.grad(loss_fn(torch.log_softmax(theta, dim=-1)), theta)
        with torch.no_grad():
            theta -= lr * grad
    return torch.log_softmax(theta.detach(), dim=-1)


def figure1(beta, lam, steps):
    """Three responses with rewards 0.1, 0.85, 0.9 under a uniform SFT model, trained on all pairs."""
    rewards = torch.tensor([[0.1, 0.85, 0.9]])
    ref = torch.full((1, 3), -math.log(3.0))
    rows = {
        "SFT (uniform)": ref,
        "DPO, all pairs": train_free_softmax(lambda lp: pairwise_loss(dpo_loss, lp, ref, rewards, beta), ref, steps),
        "VCB, all pairs": train_free_softmax(lambda lp: vcb_loss(lp, ref, rewards, beta, lam), ref, steps),
        "closed-form optimum": optimal_policy(ref, rewards, beta),
    }
    return {name: lp.exp()[0].tolist() for name, lp in rows.items()}


if __name__ == "__main__":
    beta, lam, steps = 1.0, 0.1, 500  # the pipeline's beta and lam (config.py); the optimum is the same for every lam
    print(f"Figure 1: rewards r = 0.1, 0.85, 0.9; uniform SFT; beta = {beta}, lam = {lam}; {steps} gradient steps")
    print(f"{'':22s} {'p(y1) r=0.1':>12s} {'p(y2) r=0.85':>13s} {'p(y3) r=0.9':>12s}")
    for name, p in figure1(beta, lam, steps).items():
        print(f"{name:22s} {p[0]:12.3f} {p[1]:13.3f} {p[2]:12.3f}")
    print("DPO sees only the order y3 > y2 > y1 and pushes y2 towards y1; VCB keeps the reward gaps:\n"
          "y2 and y3 end nearly equal, at the optimum pi_sft * exp(r / (beta * sigma)) / Z.")
