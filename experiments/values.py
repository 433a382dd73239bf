"""
experiments/values.py: values or form? The value-aware losses (VCB, offline REBEL, InfoNCA, ODPO)
against DPO and SLiC at matched KL, on candidates scored by the reward model and by the gold reward,
on the built-in task and on its stakes variant (python -m experiments values).
"""
import dataclasses

import torch

import train
import vcb
from experiments import report
from experiments.ablations import gold_candidates
from experiments.harness import main_grid, need_gold, policy_grid, write_results
from machinery import records
from machinery.config import STAGES, as_dict, sweep_list
from machinery.files import make_folder, read_jsonl, write_json, write_text
from machinery.runtime import path
from tasks import reviews


VALUES = ["vcb", "rebel", "infonca", "odpo", "dpo", "slic"]  # the value-aware losses, and the order-based ones to beat


def values(cfg, env):
    """The value-aware losses (VCB, offline REBEL, InfoNCA, ODPO) against DPO and SLiC at matched KL,
    on candidates scored by the reward model and by the gold reward (exact values: where a
    value-aware loss should gain most, if anywhere); on the built-in task, and on its stakes
    variant, where every other film's reviews matter 10x less (its own run: ablations/values/stakes/run).
    Each writes the reward/KL tables and the level of each method's deltas along training."""
    need_gold(cfg, "values")
    stakes = dataclasses.replace(cfg, out_dir=path(cfg, "ablations", "values", "stakes", "run"), stakes=True)
    if env.master:
        make_folder(stakes.out_dir)
        write_json(path(stakes, "config.json"), as_dict(stakes))
    for stage in STAGES[:STAGES.index("sample") + 1]:
        train.run_stage(stakes, env, stage)
    betas, seeds = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int)
    candidate_sets = []
    for task, folder, gold_folder, name in ((cfg, "ablations/values", "ablations/reward_source", "the built-in task"),
                                            (stakes, "ablations/values/stakes", "gold", "the stakes variant")):
        gold = gold_candidates(task, env, gold_folder)
        runs = [{**r, "variant": "RM"} for r in main_grid(task, env, VALUES)]
        runs += policy_grid(task, env, "gold", gold_folder, VALUES, betas, seeds, candidates=gold, variant="gold")
        write_results(cfg, env, folder, runs, f"Value-aware and order-based losses on {name}",
                      f"Value-aware and order-based losses on {name}, candidates scored by the RM or by the gold reward")
        if env.master:
            write_text(path(cfg, folder, "levels.md"), levels_table(runs) + "\n")
        candidate_sets += [(f"{name}, RM", path(task, "candidates.jsonl")), (f"{name}, gold", gold)]
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


def levels_table(runs, last=10):
    """Each method's mean delta of a prompt's candidates (the `level` its curve logs) over the last
    `last` steps of training, mean ± std over seeds, at each beta: the common level that the
    difference methods leave free. A markdown table."""
    table = {}
    for r in runs:
        if r.get("beta") is not None:  # SFT and RRHF have none
            rows = [c.get("level") for c in records.read_curves(r["curve"][0]) if c["task"] == r["curve"][1]]
            rows = [v for v in rows[-last:] if v is not None]
            if rows:
                table.setdefault((r["method"], r["variant"]), {}).setdefault(r["beta"], []).append(sum(rows) / len(rows))
    betas = sorted({b for by_beta in table.values() for b in by_beta})
    lines = ["| method | " + " | ".join(f"level at beta {b:g}" for b in betas) + " |", "|---" * (len(betas) + 1) + "|"]
    for (method, variant), by_beta in table.items():
        cells = [report.fmt(report.spread(by_beta.get(b, []))) for b in betas]
        lines.append(f"| {method} ({variant}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
