"""
experiments/values.py: what are reward values worth? Two experiments on the sweep's instrument
(experiments/sweep.py):

    python -m experiments values            # the value-aware losses against DPO and SLiC
    python -m experiments values_vs_ranks   # the same loss told the true values or only their ranks

values: VCB, offline REBEL, InfoNCA and ODPO against DPO and SLiC, on candidates scored by the reward
model and by the gold reward, on the built-in task and on its stakes variant (every other film's
reviews matter 10x less; a pipeline of its own per seed, in ablations/values/stakes/run).

values_vs_ranks: a judge whose gaps are uneven, g = exp(k * gold) for k in KS, and each value-aware
loss trained on the true values g, on a rank surrogate with the same order, mean and spread per
prompt (so only the sizes of the gaps differ), and (VCB) on a reward model learnt from labels drawn
from g; the order-based losses see the same order at every k and are trained once. Everything is
judged by the same g.
"""
import dataclasses
import math
import os

import torch

import vcb
from experiments import report
from experiments.ablations import gold_candidates, rescored
from experiments.harness import need_gold, seed_config
from experiments.sweep import Arm, run, training, usual_lr
from machinery import records
from machinery.config import sweep_list
from machinery.files import read_jsonl, write_jsonl, write_text
from machinery.runtime import path
from tasks import reviews

VALUES = ["vcb", "rebel", "infonca", "odpo", "dpo", "slic"]  # the value-aware losses, and the order-based ones to beat


def values(cfg, env):
    """Each task's value-aware and order-based losses with the RM's and the gold reward's candidates,
    then the level of their deltas along training and the spread of the candidates' rewards by stake."""
    need_gold(cfg, "values")
    stakes = dataclasses.replace(cfg, out_dir=path(cfg, "ablations", "values", "stakes", "run"), stakes=True)
    candidate_sets = []
    for task, out, name in ((cfg, path(cfg, "ablations/values"), "the built-in task"),
                            (stakes, path(cfg, "ablations/values/stakes"), "the stakes variant")):
        arms = [Arm(m, "RM", tag="") for m in VALUES] + \
            [Arm(m, "gold", candidates=gold_candidates(env), folder="ablations/reward_source") for m in VALUES]
        measured = run(task, env, "ablations/values", arms, f"Value-aware and order-based losses on {name}",
                       compare_to="RM", out=out)
        if env.master:
            write_text(os.path.join(out, "levels.md"), levels_table(task, arms, measured["grid"]) + "\n")
        run_cfg = seed_config(task, task.seed)
        candidate_sets += [(f"{name}, RM", path(run_cfg, "candidates.jsonl")),
                           (f"{name}, gold", path(run_cfg, "ablations/reward_source", "candidates_gold.jsonl"))]
    if env.master:
        write_text(path(cfg, "ablations/values/spreads.md"), spreads_table(candidate_sets) + "\n")


def spreads_table(candidate_sets):
    """sigma(x), the spread of a prompt's candidate rewards, on the prompts the stakes variant scales
    by 0.1 (reviews.LOW_STAKES) and on the others, mean ± std over prompts, for each candidate set
    [(label, file)]: whether the stakes reach the rewards a method trains on. A markdown table."""
    lines = ["| candidates | sigma(x), prompts at stake 1 | sigma(x), prompts at stake 0.1 on the stakes variant |", "|---|---|---|"]
    for label, file in candidate_sets:
        recs = read_jsonl(file)
        sigma = vcb.reward_sigma(torch.tensor([r["rewards"] for r in recs])).tolist()
        low = [reviews.stake(r["prompt"]) < 1 for r in recs]
        cells = [report.fmt(report.spread([s for s, is_low in zip(sigma, low) if is_low == want])) for want in (False, True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def levels_table(cfg, arms, grid, last=10):
    """Each arm's mean delta of a prompt's candidates (the `level` its curve logs) over the last `last`
    steps of its trainings at the grid's first learning rate, at each of its betas: mean and 95%
    interval over the seeds. The common level that the difference methods leave free. A markdown table."""
    lines = ["| method | level at each beta of its grid (mean [95% CI] over seeds) |", "|---|---|"]
    for arm in arms:
        cells = []
        for beta in grid.betas(arm.method):
            levels = []
            for seed in grid.seeds:
                job = training(seed_config(cfg, seed), arm, beta, grid.lrs[0], grid.snapshots)
                curve = [c.get("level") for c in records.read_curves(os.path.join(os.path.dirname(job.file), "curves.jsonl"))
                         if c["task"] == job.name]
                curve = [v for v in curve[-last:] if v is not None]
                if curve:
                    levels.append(sum(curve) / len(curve))
            cells.append(f"β {beta:g}: {report.ci(report.interval(levels), signed=True)}")
        lines.append(f"| {arm.label} | " + "; ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# what are reward values worth? The same loss told the true values, or only their ranks

KS = (0, 2, 4, 6)            # the judge g = exp(k * vader) (k = 0: VADER itself): the same order, gaps ever more uneven
VALUE_AWARE = ["vcb", "rebel", "infonca"]  # the losses told the values
ORDER_BASED = ["dpo", "slic", "ipo", "rrhf"]  # told only the order, which every k keeps: trained once, judged by each


def judge(k):
    """g_k: the gold reward (VADER, in [-1, 1]) at k = 0, else exp(k * vader). Monotone, so every k
    keeps the candidates' order; as k grows the best responses' gaps dwarf the rest's."""
    return (lambda v: v) if k == 0 else (lambda v: math.exp(k * v))


def ranks(values):
    """The rank of each value among values, 0 for the smallest; tied values share their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in order[i:j + 1]:
            out[t] = (i + j) / 2
        i = j + 1
    return out


def rank_surrogate(values):
    """A prompt's rewards as evenly spaced values in the same order, with the same mean and (population)
    standard deviation: a loss told these learns the order and the scale of the true values, not the
    sizes of their gaps. Tied rewards keep equal values; a prompt whose rewards are all equal keeps them."""
    n, r = len(values), ranks(values)
    mean, mean_r = sum(values) / n, sum(r) / n
    sd, sd_r = (sum((v - mean) ** 2 for v in values) / n) ** 0.5, (sum((x - mean_r) ** 2 for x in r) / n) ** 0.5
    return [mean + (x - mean_r) * sd / sd_r for x in r] if sd_r > 0 else list(values)


def gap_rank_correlation(values):
    """Within a prompt, the Pearson correlation between the reward gaps r_i - r_j and the rank gaps of
    its pairs i < j: near 1 when the values are spread like their ranks (they tell a loss little more
    than the order), lower when a few gaps are much larger than the rest. NaN when all are equal."""
    r = ranks(values)
    pairs = [(values[i] - values[j], r[i] - r[j]) for i in range(len(values)) for j in range(i + 1, len(values))]
    return report.pearson([a for a, _ in pairs], [b for _, b in pairs])


def rewritten(env, k, how):
    """seed options -> the seed's gold candidates with their rewards through g_k ("true") or its rank
    surrogate ("rank"), written into the seed's folder."""
    def make(scfg):
        file = path(scfg, FOLDER, f"candidates_{how}_k{k}.jsonl")
        if env.master:
            g = judge(k)
            recs = read_jsonl(gold_candidates(env)(scfg))
            rewards = [[g(v) for v in r["rewards"]] for r in recs]
            write_jsonl(file, [{**r, "rewards": rank_surrogate(v) if how == "rank" else v} for r, v in zip(recs, rewards)])
        return file
    return make


def rm_scored(env, k):
    """seed options -> the seed's candidates scored by a reward model trained, from the seed's SFT, on
    preference labels drawn from g_k (Bradley-Terry, pref_tau scaled by g_k's spread over VADER's on
    the seed's gold candidates, so the labels are as noisy for every k)."""
    def make(scfg):
        gold = [v for r in read_jsonl(gold_candidates(env)(scfg)) for v in r["rewards"]]
        spread = lambda vs: (sum((v - sum(vs) / len(vs)) ** 2 for v in vs) / len(vs)) ** 0.5  # noqa: E731
        tau = scfg.pref_tau * spread([judge(k)(v) for v in gold]) / spread(gold)
        return rescored(env, f"k{k}", dict(n_prefs=scfg.n_prefs, pref_tau=tau), {}, folder=FOLDER, judge=judge(k))(scfg)
    return make


FOLDER = "ablations/values_vs_ranks"


def values_vs_ranks(cfg, env):
    """For each k of KS, the value-aware losses trained on the true values g_k, on their rank surrogate
    and (VCB) on a reward model learnt from labels drawn from g_k, beside the order-based losses, all
    judged by g_k at each KL budget: (true - rank) is what the sizes of the gaps are worth to a loss,
    (rank - DPO) what its form is worth with the sizes aside. One learning rate for every training (x1
    where --sweep_lrs holds it), so that true and rank have the same budget."""
    need_gold(cfg, "values_vs_ranks")
    cfg = dataclasses.replace(cfg, sweep_lrs="%g" % usual_lr(sweep_list(cfg, "sweep_lrs", float))[0])
    gold = gold_candidates(env)
    results = {}
    for k in KS:
        arms = [Arm(m, "", candidates=gold, folder="ablations/reward_source", tag="gold") for m in ORDER_BASED]
        for m in VALUE_AWARE:
            arms.append(Arm(m, "true", candidates=gold, folder="ablations/reward_source", tag="gold") if k == 0 else
                        Arm(m, "true", candidates=rewritten(env, k, "true"), folder=FOLDER, tag=f"true-k{k}"))
            arms.append(Arm(m, "rank", candidates=rewritten(env, k, "rank"), folder=FOLDER, tag=f"rank-k{k}"))
        arms.append(Arm("vcb", "RM", tag="") if k == 0 else Arm("vcb", "RM", candidates=rm_scored(env, k), folder=FOLDER,
                                                                  tag=f"rm-k{k}"))
        name = "gold reward" if k == 0 else f"exp({k} * gold reward)"
        results[k] = run(cfg, env, FOLDER, arms, f"Values or ranks, judged by {name}", compare_to="rank",
                         out=path(cfg, FOLDER, f"k{k}"), rescale=judge(k))
    if env.master:
        corr = {k: correlations(cfg, k) for k in KS}
        write_text(path(cfg, FOLDER, "values_vs_ranks.md"), summary_tables(results, corr) + "\n")
        plot_worth(results, path(cfg, FOLDER, "values_vs_ranks.png"))


def correlations(cfg, k):
    """The mean over prompts (and seeds) of the gap-rank correlation of g_k on the gold candidates."""
    out = []
    for seed in sweep_list(cfg, "sweep_seeds", int):
        for r in read_jsonl(path(seed_config(cfg, seed), "ablations/reward_source", "candidates_gold.jsonl")):
            c = gap_rank_correlation([judge(k)(v) for v in r["rewards"]])
            if c == c:  # not NaN
                out.append(c)
    return report.interval(out)


def summary_tables(results, corr):
    """The answer in two tables: per loss and k, (true - rank) at each KL budget, and (rank - DPO)."""
    kls = results[KS[0]]["grid"].kls
    rows = {k: res["tables"].get("path/eval", {}).get("rows", []) for k, res in results.items()}  # a row per arm and budget
    lines = []
    for title, key, label in (("What the sizes of the gaps are worth: true values minus rank surrogate, same loss", "vs_base",
                               "{m} (true)"),
                              ("What the form is worth, sizes aside: rank surrogate minus DPO", "vs_dpo", "{m} (rank)"),
                              ("Does a learned reward model carry the sizes? VCB on the RM's scores minus DPO", "vs_dpo", "{m} (RM)")):
        lines += [f"{title} (held-out prompts, the training path; mean [95% CI] over seeds, and the verdict):", "",
                  "| loss | k | gap-rank correlation | " + " | ".join(f"KL ≤ {kl:g}" for kl in kls) + " |",
                  "|" + "---|" * (3 + len(kls))]
        for m in (["vcb"] if "RM" in label else VALUE_AWARE):
            for k in KS:
                cells = []
                for kl in kls:
                    r = next((x for x in rows[k] if x["label"] == label.format(m=m) and x["k"] == kl), None)
                    d = r.get(key) if r else None
                    cells.append(f"{report.ci(d, signed=True)} {report.verdict(d)}" if d and d["mean"] is not None else "-")
                lines.append(f"| {m} | {k} | {report.ci(corr[k])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_worth(results, file):
    """(true - rank) at each KL budget against k, a line per loss, with 95% intervals, as a share of the
    rank surrogate's reward there: g_k's scale grows with k, and a share reads the same at every k."""
    plt = report.pyplot()
    kls = results[KS[0]]["grid"].kls
    fig, axes = plt.subplots(1, len(kls), figsize=(3.2 * len(kls), 3.4), sharey=True, squeeze=False)
    for ax, kl in zip(axes[0], kls):
        for m in VALUE_AWARE:
            pts = []
            for k in KS:
                rows = results[k]["tables"].get("path/eval", {}).get("rows", [])
                r = next((x for x in rows if x["label"] == f"{m} (true)" and x["k"] == kl), None)
                base = next((x for x in rows if x["label"] == f"{m} (rank)" and x["k"] == kl), None)
                d, scale = (r or {}).get("vs_base"), (base or {}).get("reward", {}).get("mean")
                if d and d["lo"] is not None and scale:
                    pts.append((k, 100 * d["mean"] / scale, 100 * (d["mean"] - d["lo"]) / scale, 100 * (d["hi"] - d["mean"]) / scale))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                            marker="o", capsize=3, color=report.COLORS.get(m), label=report.label(m))
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"KL budget {kl:g}", fontsize=9)
        ax.set_xlabel("k (judge exp(k * gold))")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("true values − rank surrogate,\n% of the surrogate's reward")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="upper right")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    report.save_figure(plt, fig, file)
