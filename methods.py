"""
methods.py: each offline method's loss on a batch of prompts' scored candidates, by its name: the
function of vcb.py it is, with the run's settings (beta, lam, the candidate set's reward spread),
what its mean divides by, and the metrics every method logs on the same footing. train.align_loss
computes the log-probs and calls offline_loss; the losses themselves are in vcb.py.
"""
import torch

import vcb

PAIR_LOSSES = {"dpo": vcb.dpo_loss, "ipo": vcb.ipo_loss, "slic": vcb.slic_loss}


def reward_spread(rewards):
    """The population std of every candidate reward of the set (1,): the one scale of the methods that
    use one for every prompt (VCB with --vcb_sigma=global, REBEL, InfoNCA, ODPO)."""
    return vcb.reward_sigma(rewards.flatten()[None])


def vcb_sigma(cfg, spread):
    """The sigma VCB divides reward gaps by: None for each prompt's own sigma(x) (the paper's), or with
    --vcb_sigma=global the set's spread."""
    return spread if cfg.vcb_sigma == "global" else None


def offline_loss(cfg, method, logps, ref_logps, rewards, spread, reduction="sum"):
    """An offline method's loss from vcb.py on b prompts' n candidates (b, n). spread: reward_spread
    of the whole set. The value-aware peers are set so that their optimum on the candidates is VCB's
    with one sigma: delta_i - delta_j = (r_i - r_j) / (beta * spread) (docs/method.md)."""
    if method == "vcb":
        return vcb.vcb_loss(logps, ref_logps, rewards, cfg.beta, cfg.lam, cfg.sigma_floor, vcb_sigma(cfg, spread), reduction)
    if method == "rrhf":
        return vcb.rrhf_loss(logps, rewards, reduction=reduction)
    if method == "rebel":
        return vcb.rebel_loss(logps, ref_logps, rewards, 1 / (cfg.beta * spread), reduction)
    if method == "infonca":
        return vcb.infonca_loss(logps, ref_logps, rewards, cfg.beta, spread, reduction)
    if method == "odpo":
        return vcb.odpo_pairwise_loss(logps, ref_logps, rewards, cfg.beta, spread, reduction=reduction)
    return vcb.pairwise_loss(PAIR_LOSSES[method], logps, ref_logps, rewards, cfg.beta, reduction)


def loss_count(cfg, method, rewards):
    """What a method's mean divides its summed loss by, for these prompts' rewards (b, n)."""
    if method == "vcb":
        return vcb.vcb_count(rewards, cfg.sigma_floor)
    if method == "rebel":
        return len(rewards) * rewards.size(1) * (rewards.size(1) - 1) // 2  # every unordered pair
    return vcb.pair_count(rewards) if method in PAIR_LOSSES or method == "odpo" else len(rewards)


def align_metrics(method, logps, ref, rewards, cfg, spread):
    """What a user watches, for every method on the same footing: over the step's ordered pairs, the
    implicit reward margin beta * h and the pair accuracy (h > 0); the mean delta of the candidates
    (`level`: the common level of a prompt's candidates, which the difference methods leave free);
    for VCB also the gap correlation and the share of skipped prompts. RRHF has no reference: its h
    is the gap in length-averaged logp, and it has no level."""
    b, w, l = vcb.preference_pairs(rewards)
    ref = torch.zeros_like(ref) if method == "rrhf" else ref
    h = vcb.margin(logps[b, w], logps[b, l], ref[b, w], ref[b, l])
    out = {"margin": (cfg.beta * h).mean() if len(h) else 0.0, "acc": (h > 0).float().mean() if len(h) else 0.0}
    if method != "rrhf":
        out["level"] = (logps - ref).mean()
    if method == "vcb":
        diag = vcb.vcb_diagnostics(logps, ref, rewards, cfg.beta, cfg.sigma_floor, vcb_sigma(cfg, spread))
        out.update(gap_corr=diag["gap_corr"], skipped=diag["skipped"])
    return out
