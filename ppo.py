"""
ppo.py: the online baselines the paper sets out to replace, PPO and RLOO. The policy samples, the
reward model scores, the policy learns, again and again (docs/method.md, "PPO and RLOO"); the
losses are pure functions in vcb.py, this file is the loop. train.py's align stage runs it for --methods=ppo,rloo:

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
import os

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import data
import report
import vcb
from config import ConfigError
from evaluate import decode, score_rewards
from runtime import (TrainingError, batch_indices, check_healthy, kept_checkpoint, load_data, load_model, log, lr_at,
                     note_progress, path, resume, save_progress, save_snapshot)


def online(cfg, env, enc, method, seed, task, cands):
    """Train one policy with PPO or RLOO from the SFT weights; returns it and the critic (PPO's; None for
    RLOO). cands: the SFT candidates, whose reward spread normalises the reward model's scores (so that
    beta means the same thing as for the other methods, whatever the reward model's scale)."""
    if env.world > 1:
        raise ConfigError(f"{task.name}: ppo and rloo run in one process (run them without torchrun)")
    torch.manual_seed(seed)
    policy = load_model(path(cfg, "sft.pt"), env, enc, cfg)
    ref = load_model(path(cfg, "sft.pt"), env, enc, cfg).eval()
    rm = load_model(path(cfg, "rm.pt"), env, enc, cfg).eval()
    critic = load_model(path(cfg, "rm.pt"), env, enc, cfg) if method == "ppo" else None  # a value at every position
    models = [policy] + ([critic] if critic else [])
    optimizers = [m.configure_optimizers(cfg.weight_decay, lr, (0.9, 0.95), env.device_type)
                  for m, lr in zip(models, [cfg.online_lr, cfg.critic_lr])]
    state = {"policy": policy, "opt_policy": optimizers[0]} | ({"critic": critic, "opt_critic": optimizers[1]} if critic else {})
    start, extra = resume(cfg, env, task, state)
    beta = extra.get("beta", cfg.beta)  # the adaptive controller moves it; it is saved with the progress
    mu, sd = cands.rewards.mean().item(), cands.rewards.std().item()
    prompts = [r["prompt"] for r in load_data(cfg, "align_prompts")]
    curves = os.path.join(os.path.dirname(task.outputs[0]), "curves.jsonl")
    report.curves_from(curves, task.name, start)
    last_good = start or None
    bar = tqdm(range(start, cfg.online_iters), desc=task.name, initial=start, total=cfg.online_iters,
               disable=not (env.master and env.bars), dynamic_ncols=True, leave=False)
    for it in bar:
        note_progress(f"{task.name} iteration {it + 1}/{cfg.online_iters}")
        batch = rollout(cfg, env, enc, policy, ref, rm, critic, prompts, seed, it, mu, sd)
        try:
            if method == "ppo":
                metrics = ppo_update(cfg, env, enc, policy, critic, optimizers, batch, beta, seed, it)
            else:
                metrics = rloo_update(cfg, env, enc, policy, optimizers[0], batch, beta, it)
        except FloatingPointError as e:
            raise TrainingError(f"{task.name}: {e} at iteration {it}; stopped, and {kept_checkpoint(cfg, task, last_good)}") from None
        kl = batch["kl"].mean().item()
        if cfg.ppo_target_kl > 0:
            beta = vcb.adaptive_beta(beta, kl, cfg.ppo_target_kl, len(batch["eos"]), cfg.ppo_kl_horizon)
        metrics = {"score": batch["raw_scores"].mean().item(), "kl": kl, "eos_rate": batch["eos"].float().mean().item(),
                   "beta": beta, **metrics}
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()})
        report.curves_append(curves, {"task": task.name, "step": it + 1, "lr": optimizers[0].param_groups[0]["lr"], **metrics})
        if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.online_iters:
            log(env, f"{task.name} iteration {it + 1}/{cfg.online_iters}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        save_snapshot(cfg, env, task, it + 1, policy, enc)
        probe = lambda: sequence_logps(policy, packed(cfg, enc, batch["groups"][:1], env), env)[0].sum()  # noqa: E731
        if (it + 1) % cfg.ckpt_interval == 0 and it + 1 < cfg.online_iters:
            check_healthy(cfg, env, task, models, probe, it + 1, last_good)
            save_progress(cfg, env, task, it + 1, state, beta=beta)
            last_good = it + 1
    bar.close()
    if cfg.online_iters > start:
        check_healthy(cfg, env, task, models, probe, None, last_good)
    return policy, critic


@torch.no_grad()
def rollout(cfg, env, enc, policy, ref, rm, critic, prompts, seed, it, mu, sd):
    """One batch of experience: online_k samples for each of online_prompts prompts from the current
    policy, their normalised scores, and per token (padded (S, T), S = prompts x k) the log-probs under
    the policy and SFT, the critic's values and the mask of response tokens."""
    policy.eval()
    chosen = [prompts[i] for i in batch_indices(len(prompts), cfg.online_prompts, it, seed)]
    ids = [data.encode_prompt(enc, p, cfg.block_size - cfg.max_new_tokens) for p in chosen]
    g = torch.Generator(env.device).manual_seed(seed * 1_000_003 + 7_000_001 + it)
    k = cfg.online_k
    with env.autocast():
        outs = policy.generate(ids, cfg.max_new_tokens, temperature=1.0, stop_token=enc.eot_token, num_samples=k, generator=g)
    groups = [(ids[i], outs[i * k:(i + 1) * k]) for i in range(len(ids))]        # the exact sampled tokens
    texts = [decode(enc, o) for o in outs]
    raw = torch.tensor(score_rewards(cfg, env, rm, enc, [data.encode_group(enc, p, texts[i * k:(i + 1) * k])
                                                          for i, p in enumerate(chosen)]), device=env.device)
    eos = torch.tensor([o[-1] == enc.eot_token for o in outs], device=env.device)
    scores = (raw - mu) / sd - cfg.eos_penalty * (~eos).float()  # a response cut short is penalised (docs/method.md)
    batch = {"groups": groups, "raw_scores": raw, "scores": scores, "eos": eos}
    p = packed(cfg, enc, groups, env)  # packed once, read by each model
    batch["old_logp"], batch["mask"] = token_values(policy, p, env)
    batch["ref_logp"], _ = token_values(ref, p, env)
    if critic is not None:
        batch["old_values"], _ = token_values(critic, p, env, values=True)
    batch["kl"] = ((batch["old_logp"] - batch["ref_logp"]) * batch["mask"]).sum(-1)  # (S,) sum of k1 per response
    return batch


def packed(cfg, enc, groups, env):  # the responses packed after their prompts (data.pack), on the device
    return data.pack(groups, cfg.block_size, enc.eot_token).to(env.device)


def token_values(model, p, env, values=False):
    """Per response token of packed groups p, padded (S, T): the model's log-prob of the token
    (values=False) or the critic's value of the state before it (values=True), with the (S, T)
    mask of real tokens."""
    with env.autocast():
        flat = model(p.idx, pos=p.pos, attn_mask=p.mask, at=(p.rows, p.cols), targets=None if values else p.targets)
    padded = pad_sequence(flat.split(p.lengths.tolist()), batch_first=True)                 # (S, T)
    mask = torch.arange(padded.size(1), device=padded.device)[None, :] < p.lengths[:, None]
    return padded, mask.float()


def sequence_logps(model, p, env):
    logp, mask = token_values(model, p, env)
    return (logp * mask).sum(-1), logp, mask


def minibatches(n_groups, count, generator=None):
    """count slices of the prompt groups: in rollout order (the first pass, whose first minibatch then
    sees exactly the old log-probs) or shuffled by generator."""
    order = torch.randperm(n_groups, generator=generator).tolist() if generator is not None else list(range(n_groups))
    size = math.ceil(n_groups / count)
    return [order[i:i + size] for i in range(0, n_groups, size)]


def rows_of(group_ids, k):
    return [g * k + j for g in group_ids for j in range(k)]  # the responses of those prompts, S-indexed


def ppo_update(cfg, env, enc, policy, critic, optimizers, batch, beta, seed, it):
    """PPO on one rollout batch: rewards, GAE, whitening, then ppo_epochs x ppo_minibatches steps."""
    mask, k = batch["mask"], cfg.online_k
    rewards = vcb.ppo_token_rewards(batch["old_logp"], batch["ref_logp"], batch["scores"], mask, beta)
    advantages, returns = vcb.gae(rewards, batch["old_values"], mask, cfg.ppo_gamma, cfg.ppo_lambda)
    advantages = vcb.whiten(advantages, mask)
    set_lr(cfg, optimizers, it)
    policy.train()
    critic.train()
    stats, n = {}, 0
    for epoch in range(cfg.ppo_epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + it * 101 + epoch) if epoch else None
        for mb in minibatches(len(batch["groups"]), cfg.ppo_minibatches, g):
            rows, groups = rows_of(mb, k), [batch["groups"][i] for i in mb]
            with env.autocast():
                p = packed(cfg, enc, groups, env)
                _, logp, m = sequence_logps(policy, p, env)
                values, _ = token_values(critic, p, env, values=True)
            T = m.size(1)
            pg_loss, s = vcb.ppo_policy_loss(logp, batch["old_logp"][rows, :T], advantages[rows, :T], m, cfg.ppo_clip)
            vf_loss = vcb.ppo_value_loss(values, batch["old_values"][rows, :T], returns[rows, :T], m, cfg.ppo_clip)
            step(cfg, optimizers, [policy, critic], pg_loss + cfg.ppo_vf_coef * vf_loss)
            s.update(pg_loss=pg_loss.item(), value_loss=vf_loss.item())
            if n == 0:
                stats["first_approx_kl"] = s["approx_kl"]  # 0 up to rounding: the check that logp == old logp
            for key, v in s.items():
                stats[key] = stats.get(key, 0.0) + v
            n += 1
    return {key: v / n if key != "first_approx_kl" else v for key, v in stats.items()}


def rloo_update(cfg, env, enc, policy, optimizer, batch, beta, it):
    """RLOO on one rollout batch: leave-one-out advantages per prompt, one REINFORCE step."""
    P, k = len(batch["groups"]), cfg.online_k
    advantages = vcb.rloo_advantages(batch["scores"].view(P, k), batch["kl"].view(P, k), beta).view(-1)
    set_lr(cfg, [optimizer], it)
    policy.train()
    with env.autocast():
        seq_logps, _, _ = sequence_logps(policy, packed(cfg, enc, batch["groups"], env), env)
    loss = vcb.reinforce_loss(seq_logps, advantages)
    step(cfg, [optimizer], [policy], loss)
    return {"loss": loss.item(), "advantage_std": advantages.std().item()}


def set_lr(cfg, optimizers, it):
    for opt, lr in zip(optimizers, [cfg.online_lr, cfg.critic_lr]):
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg.online_iters, lr, cfg.warmup_steps)


def step(cfg, optimizers, models, loss):
    """One gradient step of each model on loss (a sum of their losses); nothing moves if it is not finite."""
    if not torch.isfinite(loss):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the loss is {loss.item()}")
    loss.backward()
    for model, opt in zip(models, optimizers):
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
