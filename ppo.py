"""
ppo.py: the online baselines the paper sets out to replace, PPO and RLOO. The policy samples, the
reward model scores, the policy learns, again and again (docs/method.md, "PPO and RLOO"); the
losses are pure functions in vcb.py, and this file is their loop (train) and one iteration of it,
which train.py's align stage runs for --methods=ppo,rloo:

    python train.py --methods=vcb,ppo,rloo
    python train.py --stage=align --methods=ppo --beta=0.1 --ppo_target_kl=4

Each iteration: online_prompts prompts from the alignment prompts, online_k samples each from the
current policy at temperature 1 with no top-k/top-p; the frozen reward model scores each response
(normalised by the mean and spread of its scores on the SFT candidates, minus eos_penalty when the
response ran out of tokens before <|endoftext|>); then
  PPO   per-token rewards -beta * k1 + the score at the last token, values from a critic initialised
        from the reward model, GAE, whitened advantages, ppo_epochs passes of ppo_minibatches clipped
        policy and value steps;
  RLOO  the sequence reward score - beta * sum k1, the mean reward of the prompt's other samples as
        baseline, one REINFORCE step.
What it holds in memory, where VCB holds one model: the policy, the frozen SFT model (the KL's
reference), the frozen reward model, and for PPO a critic, with the optimizers of those it trains.
"""
import math
from dataclasses import dataclass

import torch

import data
import packing
import vcb
from evaluate import decode, score_rewards
from machinery.progress import Progress
from machinery.runtime import batch_indices, load_model, lr_at, path, wrap


def train(cfg, env, enc, name, seed, task, cands):
    """PPO or RLOO (name) from the SFT weights: online_iters iterations of rollouts and the updates
    on them, with the training loop's resume, curves, checkpoints and health checks. cands: the SFT
    candidates, whose reward spread normalises the reward model's scores. Returns the policy and the
    critic (PPO's; None for RLOO)."""
    method = vcb.METHODS[name]
    o = setup(cfg, env, enc, method, seed, cands)
    progress = Progress(cfg, env, task, o.state, cfg.online_iters, unit="iteration", extra={"beta": cfg.beta})
    batch = None

    def probe():  # the health check's forward pass: one prompt's rollouts again
        return packing.response_logps(packing.Reader(o.policy), packed(cfg, batch["groups"][:1], env)).sum()

    for it in range(progress.start, cfg.online_iters):
        metrics, progress.extra["beta"], batch = iteration(cfg, env, enc, o, method, seed, it, progress.extra["beta"])
        progress.record(it, lr_at(it, cfg.online_iters, cfg.online_lr, cfg.warmup_steps), metrics)
        progress.snapshot(it + 1, o.policy, enc)
        progress.checkpoint(it + 1, probe)
    progress.finish(probe)
    return o.policy, o.critic


@dataclass
class Online:
    """What PPO and RLOO hold while they train."""
    policy: torch.nn.Module   # the GPT being trained, from SFT
    ref: torch.nn.Module      # the frozen SFT model: the KL's reference
    rm: torch.nn.Module       # the frozen reward model
    critic: torch.nn.Module   # PPO's value model, from the reward model (None for RLOO)
    runners: list             # the policy and the critic as the updates run them (packing.Reader, runtime.wrap)
    optimizers: list          # the policy's, then the critic's
    scaler: torch.amp.GradScaler  # scales the loss under float16 (a no-op otherwise)
    state: dict               # what a resumable checkpoint holds: the trained models and their optimizers
    prompts: list             # the alignment prompts the rollouts are drawn from
    mu: float                 # mean and spread of the RM's scores on the SFT candidates, which normalise
    sd: float                 # its scores so that beta means the same whatever the RM's scale


def setup(cfg, env, enc, method, seed, cands):
    """The models of one PPO or RLOO run (method: a vcb.Method), from the SFT and reward-model weights.
    cands: the SFT candidates, whose reward spread normalises the reward model's scores."""
    torch.manual_seed(seed)
    policy = load_model(path(cfg, "sft.pt"), env, enc, cfg)
    ref = load_model(path(cfg, "sft.pt"), env, enc, cfg).eval()
    rm = load_model(path(cfg, "rm.pt"), env, enc, cfg).eval()
    critic = load_model(path(cfg, "rm.pt"), env, enc, cfg) if method.critic else None  # PPO: a value at every position
    models = [policy] + ([critic] if critic else [])
    optimizers = [m.configure_optimizers(cfg.weight_decay, lr, (0.9, 0.95), env.device_type)
                  for m, lr in zip(models, [cfg.online_lr, cfg.critic_lr])]
    state = {"policy": policy, "opt_policy": optimizers[0]} | ({"critic": critic, "opt_critic": optimizers[1]} if critic else {})
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == torch.float16)
    return Online(policy, ref, rm, critic, [wrap(cfg, env, packing.Reader(m)) for m in models], optimizers, scaler, state,
                  [r["prompt"] for r in data.read_task_file(cfg.out_dir, "align_prompts")], cands.rewards.mean().item(),
                  cands.rewards.std().item())


def iteration(cfg, env, enc, o, method, seed, it, beta):
    """One batch of rollouts and the updates on it. Returns (metrics, the next beta, the batch)."""
    batch = rollout(cfg, env, enc, o, seed, it)
    if method.critic:
        metrics = ppo_update(cfg, env, o, batch, beta, seed, it)
    else:
        metrics = rloo_update(cfg, env, o, batch, beta, it)
    kl = batch["kl"].mean()
    if cfg.ppo_target_kl > 0:  # the controller needs the KL now: the one read of an iteration
        beta = vcb.adaptive_beta(beta, kl.item(), cfg.ppo_target_kl, len(batch["eos"]), cfg.ppo_kl_horizon)
    metrics = {"score": batch["raw_scores"].mean(), "kl": kl, "eos_rate": batch["eos"].float().mean(), "beta": beta, **metrics}
    return metrics, beta, batch


@torch.no_grad()
def rollout(cfg, env, enc, o, seed, it):
    """One batch of experience: online_k samples for each of online_prompts prompts from the current
    policy, their normalised scores, and per token (padded (S, T), S = prompts x k) the log-probs under
    the policy and SFT, the critic's values and the mask of response tokens."""
    o.policy.eval()
    chosen = [o.prompts[i] for i in batch_indices(len(o.prompts), cfg.online_prompts, it, seed)]
    ids = [data.encode_prompt(enc, p, cfg.block_size - cfg.max_new_tokens) for p in chosen]
    g = torch.Generator(env.device).manual_seed(seed * 1_000_003 + 7_000_001 + it)
    k = cfg.online_k
    with env.autocast():
        outs = o.policy.generate(ids, cfg.max_new_tokens, temperature=1.0, stop_token=enc.eot_token, num_samples=k, generator=g)
    groups = [(ids[i], outs[i * k:(i + 1) * k]) for i in range(len(ids))]        # the exact sampled tokens
    texts = [decode(enc, out) for out in outs]
    as_text = [data.encode_group(enc, p, texts[i * k:(i + 1) * k]) for i, p in enumerate(chosen)]  # the RM reads the text
    raw = torch.tensor(score_rewards(cfg, env, o.rm, as_text), device=env.device)
    eos = torch.tensor([out[-1] == enc.eot_token for out in outs], device=env.device)
    scores = (raw - o.mu) / o.sd - cfg.eos_penalty * (~eos).float()  # a response cut short is penalised (docs/method.md)
    batch = {"groups": groups, "raw_scores": raw, "scores": scores, "eos": eos}
    p = packed(cfg, groups, env)  # one batch, read by each model
    batch["old_logp"], batch["mask"] = per_token(packing.Reader(o.policy), p, env)
    batch["ref_logp"], _ = per_token(packing.Reader(o.ref), p, env)
    if o.critic is not None:
        batch["old_values"], _ = per_token(packing.Reader(o.critic), p, env, head="value")
    batch["kl"] = ((batch["old_logp"] - batch["ref_logp"]) * batch["mask"]).sum(-1)  # (S,) sum of k1 per response
    return batch


def packed(cfg, groups, env):  # the prompts with their responses as one batch (packing.py), on the device
    return packing.batch_of(groups, cfg.block_size, cfg.layout).to(env.device)


def per_token(reader, p, env, head="lm"):
    """Per response token of the batch p, padded (S, T): the model's log-prob of the token (head
    "lm") or the critic's value of the state before it (head "value"), and the (S, T) mask of real
    tokens. reader: a packing.Reader (or one torch.compile'd)."""
    with env.autocast():
        flat = reader(p, head=head)                                                 # (N,)
    return packing.by_response(p, flat)


def minibatches(n_groups, count, generator=None):
    """count slices of the prompt groups: in rollout order (the first pass, whose first minibatch then
    sees exactly the old log-probs) or shuffled by generator."""
    order = torch.randperm(n_groups, generator=generator).tolist() if generator is not None else list(range(n_groups))
    size = math.ceil(n_groups / count)
    return [order[i:i + size] for i in range(0, n_groups, size)]


def rows_of(group_ids, k):
    return [g * k + j for g in group_ids for j in range(k)]  # the responses of those prompts, S-indexed


def ppo_update(cfg, env, o, batch, beta, seed, it):
    """PPO on one rollout batch: rewards, GAE, whitening, then ppo_epochs x ppo_minibatches steps."""
    mask, k = batch["mask"], cfg.online_k
    rewards = vcb.ppo_token_rewards(batch["old_logp"], batch["ref_logp"], batch["scores"], mask, beta)
    advantages, returns = vcb.gae(rewards, batch["old_values"], mask, cfg.ppo_gamma, cfg.ppo_lambda)
    advantages = vcb.whiten(advantages, mask)
    set_lr(cfg, o.optimizers, it)
    o.policy.train()
    o.critic.train()
    stats, n = {}, 0
    for epoch in range(cfg.ppo_epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + it * 101 + epoch) if epoch else None
        for mb in minibatches(len(batch["groups"]), cfg.ppo_minibatches, g):
            rows, groups = rows_of(mb, k), [batch["groups"][i] for i in mb]
            with env.autocast():
                p = packed(cfg, groups, env)
                logp, m = per_token(o.runners[0], p, env)
                values, _ = per_token(o.runners[1], p, env, head="value")
            T = m.size(1)
            pg_loss, s = vcb.ppo_policy_loss(logp, batch["old_logp"][rows, :T], advantages[rows, :T], m, cfg.ppo_clip)
            vf_loss = vcb.ppo_value_loss(values, batch["old_values"][rows, :T], returns[rows, :T], m, cfg.ppo_clip)
            loss = pg_loss + cfg.ppo_vf_coef * vf_loss
            step(cfg, o, [o.policy, o.critic], loss)
            s.update(loss=loss.detach(), pg_loss=pg_loss.detach(), value_loss=vf_loss.detach())
            if n == 0:
                stats["first_approx_kl"] = s["approx_kl"]  # 0 up to rounding: the check that logp == old logp
            for key, v in s.items():
                stats[key] = stats.get(key, 0.0) + v
            n += 1
    return {key: v / n if key != "first_approx_kl" else v for key, v in stats.items()}


def rloo_update(cfg, env, o, batch, beta, it):
    """RLOO on one rollout batch: leave-one-out advantages per prompt, one REINFORCE step."""
    P, k = len(batch["groups"]), cfg.online_k
    advantages = vcb.rloo_advantages(batch["scores"].view(P, k), batch["kl"].view(P, k), beta).view(-1)
    set_lr(cfg, o.optimizers[:1], it)
    o.policy.train()
    with env.autocast():
        logp, m = per_token(o.runners[0], packed(cfg, batch["groups"], env), env)
    loss = vcb.reinforce_loss((logp * m).sum(-1), advantages)
    step(cfg, o, [o.policy], loss)
    return {"loss": loss.detach(), "advantage_std": advantages.std()}


def set_lr(cfg, optimizers, it):
    for opt, lr in zip(optimizers, [cfg.online_lr, cfg.critic_lr]):
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg.online_iters, lr, cfg.warmup_steps)


def step(cfg, o, models, loss):
    """One gradient step of each model on loss (a sum of their losses), through the float16 scaler
    (which skips a step whose gradients overflowed). A non-finite loss stops the run when the
    training loop reads the iteration's "loss", before anything is saved."""
    o.scaler.scale(loss).backward()
    for model, opt in zip(models, o.optimizers):
        if cfg.grad_clip > 0:
            o.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        o.scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    o.scaler.update()
