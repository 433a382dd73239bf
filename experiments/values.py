"""
experiments/values.py: values or form? The value-aware losses (VCB, offline REBEL, InfoNCA, ODPO)
against DPO and SLiC on the sweep's instrument (experiments/sweep.py), on candidates scored by the
reward model and by the gold reward, on the built-in task and on its stakes variant (every other
film's reviews matter 10x less; a pipeline of its own per seed, in ablations/values/stakes/run).

    python -m experiments values
"""
import dataclasses
import os

import torch

import vcb
from experiments import report
from experiments.ablations import gold_candidates
from experiments.harness import need_gold, seed_config
from experiments.sweep import Arm, run, training
from machinery import records
from machinery.files import read_jsonl, write_text
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
        if env.master and measured:
            write_text(os.path.join(out, "levels.md"), levels_table(task, arms, measured[2]) + "\n")
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
