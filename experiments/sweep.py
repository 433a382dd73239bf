"""
experiments/sweep.py: the instrument every comparison of methods here stands on.

    python -m experiments sweep            # every method, 5 seeds: about 28 minutes on a 2-core CPU, after the default run
    python -m experiments sweep --quick    # 2 seeds, one beta per method, one learning rate: a few minutes

1. A seed is a whole pipeline: the task's data, SFT, the reward model, the candidates, the policies and
   their evaluation (experiments/harness.py). Methods are compared within a seed, on the same SFT, RM
   and candidates, and the seeds give the intervals.
2. Each method trains at each beta of its own grid (vcb.METHODS[m].betas: its beta moves the KL its own
   way) and each learning rate of one grid for every method (--sweep_lrs, multiples of each training's
   own rate), for the usual steps (--align_steps, --online_iters), keeping --snapshots policies along
   the way, closer together early where the KL moves fastest. Every one is scored on the validation
   prompts, which neither training nor the tables see.
3. At each KL budget k (--sweep_kls), a method's policy in a seed is its best on the validation prompts
   among those whose validation KL lies between k / 1.3 and k: over its final policies only ("final"),
   or over every snapshot too ("path": its stopping point is chosen as well). That policy, and it
   alone, is scored on the held-out and out-of-distribution prompts: a reported value is a measured
   policy within a factor 1.3 below the budget, never a line drawn between two policies. A method with
   no policy in that window in some seed says so.
4. The tables give, per method and budget, the held-out reward (mean and 95% interval over seeds), the
   KL it was measured at, the setting chosen, and the paired difference from DPO (per seed, the same
   SFT, RM and candidates) with its 95% interval; "ahead", "behind" or "level" is what that interval
   says. Intervals are Student's t on the seeds' standard deviation (n - 1 degrees of freedom).
"""
import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import evaluate
from evaluate import BASELINE, SFT, reward_key
from experiments import harness, report
from machinery.config import as_dict, method_list, sweep_list
from machinery.files import write_json, write_text
from machinery.runtime import log, path
from vcb import METHODS

WINDOW = 1.3      # a budget k takes policies whose validation KL is in [k / WINDOW, k]
VARIANTS = {"path": "the best over the training path (snapshots and final policies)",
            "final": "the final policies only"}


@dataclass
class Arm:
    """A line of a comparison: a method over its grid, on each seed's candidates or on others, with
    options of its own (an ablation's variant)."""
    method: str                  # a method of vcb.METHODS
    variant: str = ""            # its label in an ablation ("" in the sweep)
    options: dict = field(default_factory=dict)  # its trainings' own options (lam, vcb_sigma, ...)
    candidates: object = None    # seed options -> the candidates file it learns from (None: the seed's own)
    folder: str = "sweep"        # where its policies go, in each seed's folder
    tag: str = None              # what its files and tasks are named after (default: the variant): the sweep's
                                 # arms in an ablation keep the sweep's ("") and reuse its policies

    @property
    def label(self):
        return f"{self.method} ({self.variant})" if self.variant else self.method


@dataclass
class Grid:
    """What an experiment trains and reads: seeds, learning-rate factors, KL budgets, snapshots."""
    seeds: list
    lrs: list
    kls: list
    snapshots: int
    quick: bool

    def betas(self, method):
        betas = list(METHODS[method].betas) or [None]  # a method without a beta trains once
        return betas[len(betas) // 2:][:1] if self.quick else betas  # --quick: the middle one


def grid_of(cfg):
    seeds, lrs = sweep_list(cfg, "sweep_seeds", int), sweep_list(cfg, "sweep_lrs", float)
    if cfg.quick:  # the first two seeds, the usual learning rate, each grid's middle beta, three snapshots
        return Grid(seeds[:2], usual_lr(lrs), sweep_list(cfg, "sweep_kls", float), min(cfg.snapshots, 3), True)
    return Grid(seeds, lrs, sweep_list(cfg, "sweep_kls", float), cfg.snapshots, False)


# -----------------------------------------------------------------------------
# measuring: every arm over its grid in every seed, chosen on validation, scored on held-out prompts

def measure(cfg, env, arms, grid, times, rescale=None):
    """Train and score every arm's grid in every seed; choose each arm's policy at each KL budget and
    variant on the validation prompts; score those on the held-out prompts. Returns the chosen
    policies {(label, seed, k, variant): candidate or None}, every candidate [dict] and SFT's metrics,
    and adds the seconds of each kind of job to times. rescale: a monotone function the gold reward of
    every sample goes through first (a judge whose gaps are uneven: experiments/values.py)."""
    t0 = time.time()
    seeds = {s: harness.seed_config(cfg, s) for s in grid.seeds}
    # the run's own seed first, apart: train.py's stages have just made it (but for a variant such as the
    # stakes task, which has a folder of its own), so the others share the workers, or one alone gets this process
    own = [scfg for scfg in seeds.values() if scfg.out_dir == cfg.out_dir]
    for group in (own, [scfg for scfg in seeds.values() if scfg.out_dir != cfg.out_dir]):
        for t in harness.run_jobs(cfg, env, harness.prepare, group):
            harness.merge_times(times, t)
    log(env, f"the pipelines of seeds {', '.join(map(str, grid.seeds))} are ready ({time.time() - t0:.0f}s)")
    jobs, of = [], []
    for arm in arms:
        for seed, scfg in seeds.items():
            for beta in grid.betas(arm.method):
                for f in grid.lrs:
                    jobs.append(training(scfg, arm, beta, f, grid.snapshots))
                    of.append((arm, seed, beta, f))
    candidates = []
    for job, (arm, seed, beta, f), (scored, t) in zip(jobs, of, harness.run_jobs(cfg, env, harness.run_training, jobs)):
        harness.merge_times(times, t)
        for step, rows in (scored or {}).items():
            candidates.append(dict(label=arm.label, method=arm.method, variant=arm.variant, seed=seed, beta=beta, lr=f,
                                   step=step, final=step == job.steps[-1], of=job.steps[-1], file=job.snapshot(step),
                                   **validation(cfg, rescaled(rows["val"], rescale))))
        if scored is None:
            candidates.append(dict(label=arm.label, method=arm.method, variant=arm.variant, seed=seed, beta=beta, lr=f,
                                   failed=True))
    chosen = {(arm.label, seed, k, v): choose([c for c in candidates if c["label"] == arm.label and c["seed"] == seed
                                               and not c.get("failed") and (v == "path" or c["final"])], k)
              for arm in arms for seed in grid.seeds for k in grid.kls for v in VARIANTS}
    files = {(seed, path(scfg, "sft.pt")): SFT for seed, scfg in seeds.items()}  # SFT, and every chosen policy once
    files.update({(c["seed"], c["file"]): c["label"] for c in chosen.values() if c})
    scorings = [harness.Scoring(seeds[seed], name, file) for (seed, file), name in files.items()]
    heldout = {}
    for job, (scored, t) in zip(scorings, harness.run_jobs(cfg, env, harness.run_scoring, scorings)):
        harness.merge_times(times, t)
        heldout[(job.cfg.seed, job.file)] = {s: rescaled(rows, rescale) for s, rows in scored.items()}
    judge = evaluate.judge_name(cfg)
    sft = {seed: heldout[(seed, path(scfg, "sft.pt"))] for seed, scfg in seeds.items()}
    for c in [c for c in chosen.values() if c]:
        scored = heldout[(c["seed"], c["file"])]
        c["heldout"] = {s: evaluate.metrics(rows, sft[c["seed"]][s], None, judge) for s, rows in scored.items()}
    sft_metrics = {seed: {s: evaluate.metrics(rows, rows, None, judge) for s, rows in by_set.items()} for seed, by_set in sft.items()}
    return chosen, candidates, sft_metrics


def training(scfg, arm, beta, f, snapshots):
    """The training job of an arm at one beta and learning-rate factor in one seed's folder."""
    m = METHODS[arm.method]
    options = {**harness.lr_of(scfg, arm.method, f), **arm.options}
    if beta is not None:
        options["beta"] = beta
    cfg = dataclasses.replace(scfg, **options)
    total = cfg.online_iters if m.online else cfg.align_steps
    steps = snapshot_steps(total, snapshots)
    variant = arm.variant if arm.tag is None else arm.tag
    tag = arm.method + (f"-{slug(variant)}" if variant else "") + (f"-beta{beta:g}" if beta is not None else "") + f"-lr{f:g}"
    return harness.Training(cfg, arm.method, f"{arm.folder}-{tag}", path(scfg, arm.folder, f"policy_{tag}.pt"), steps,
                            arm.candidates(scfg) if arm.candidates else "")


def usual_lr(lrs):
    """The one learning rate of a look or of an experiment that gives every training the same budget:
    each training's own (x1) where the grid holds it, else the grid's first."""
    return [1.0] if 1.0 in lrs else lrs[:1]


def snapshot_steps(total, n):
    """n steps of a training of `total` at which to keep the policy, the last one the end: closer
    early (step total * (i / n) ** 1.5 for i = 1..n), where the KL moves fastest, so that the low
    budgets have policies to choose from."""
    return sorted({max(1, round(total * ((i + 1) / n) ** 1.5)) for i in range(n)})


def slug(text):
    return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in text)


def rescaled(rows, rescale):
    """Scored samples with their gold reward through rescale (None: as they are)."""
    return rows if rescale is None else [{**r, "gold": rescale(r["gold"])} for r in rows]


def validation(cfg, rows):
    """A policy's KL and reward on the validation prompts, from its scored samples there."""
    key = "gold" if evaluate.judge_name(cfg) == "gold" else "rm"
    return {"val_kl": evaluate.mean([r["logp_pi"] - r["logp_sft"] for r in rows]), "val_reward": evaluate.mean([r[key] for r in rows])}


def choose(candidates, k):
    """The candidate with the highest validation reward among those whose validation KL is within the
    budget k and at least k / WINDOW; None when none is."""
    inside = [c for c in candidates if k / WINDOW <= c["val_kl"] <= k]
    return max(inside, key=lambda c: (c["val_reward"], -c["val_kl"])) if inside else None


# -----------------------------------------------------------------------------
# reading: intervals over seeds, paired differences, verdicts

def summary(arms, chosen, sft, grid, judge, split, variant, compare_to=None):
    """Rows of a table: per arm and budget, the held-out reward over the seeds that reached it, its KL,
    the settings chosen, and the paired difference from DPO of the same variant (else the sweep's)
    and, with compare_to (a variant), from the same method's arm of that variant."""
    reward, rows = reward_key(judge), []
    labels = {a.label for a in arms}
    base_of = lambda a: next((b.label for b in arms if b.method == BASELINE and b.variant == a.variant),  # noqa: E731
                             BASELINE if BASELINE in labels else None)
    for arm in arms:
        for k in grid.kls:
            got = {s: chosen[(arm.label, s, k, variant)] for s in grid.seeds}
            got = {s: c for s, c in got.items() if c and split in c["heldout"]}
            row = dict(label=arm.label, method=arm.method, variant=arm.variant, k=k, n=len(got), of=len(grid.seeds),
                       reward=report.interval([c["heldout"][split][reward] for c in got.values()]),
                       kl=evaluate.mean([c["heldout"][split]["kl"] for c in got.values()]) if got else None,
                       settings={s: (c["beta"], c["lr"], c["step"], c["of"]) for s, c in got.items()})
            base = base_of(arm)
            if base and base != arm.label:
                row["vs_dpo"] = paired(got, chosen, base, k, variant, split, reward, grid.seeds)
            if compare_to is not None and arm.variant != compare_to:
                other = next((b.label for b in arms if b.method == arm.method and b.variant == compare_to), None)
                if other:
                    row["vs_base"] = paired(got, chosen, other, k, variant, split, reward, grid.seeds)
            rows.append(row)
    sft_row = dict(label=SFT, reward=report.interval([sft[s][split][reward] for s in grid.seeds if split in sft[s]]))
    return rows, sft_row


def paired(got, chosen, other, k, variant, split, reward, seeds):
    """The paired difference (this arm minus `other`) at budget k over the seeds where both have a policy."""
    diffs = []
    for s in seeds:
        c = chosen.get((other, s, k, variant))
        if s in got and c and split in c["heldout"]:
            diffs.append(got[s]["heldout"][split][reward] - c["heldout"][split][reward])
    return report.interval(diffs)


def settings_cell(settings):
    """The setting most seeds chose at a budget: beta, learning-rate factor, step of the total (how many seeds)."""
    if not settings:
        return "-"
    (beta, lr, step, of), n = Counter(settings.values()).most_common(1)[0]
    beta = "" if beta is None else f"β {beta:g}, "
    return f"{beta}lr ×{lr:g}, step {step}/{of}" + (f" ({n}/{len(settings)})" if n < len(settings) else "")


def table(rows, sft_row, judge, compare_to=None):
    """A markdown table of summary() rows."""
    head = ["method", "KL budget", "seeds", "KL", f"{judge} reward [95% CI]" if judge in ("gold", "rm") else f"{judge} [95% CI]",
            "− DPO [95% CI]", "vs DPO"]
    head += [f"− {compare_to} [95% CI]", f"vs {compare_to}"] if compare_to else []
    lines = ["| " + " | ".join(head + ["chosen: beta, learning rate, step"]) + " |", "|" + "---|" * (len(head) + 1)]
    lines.append("| " + " | ".join([SFT, "0", f"{sft_row['reward']['n']}", "0"] + [report.ci(sft_row["reward"])] +
                                   ["-"] * (len(head) - 5) + ["-"]) + " |")
    for r in rows:
        if not r["n"]:
            cells = [r["label"], f"{r['k']:g}", f"0/{r['of']}", "-", "no policy in its window"] + ["-"] * (len(head) - 5)
        else:
            cells = [r["label"], f"{r['k']:g}", f"{r['n']}/{r['of']}", f"{r['kl']:.2f}", report.ci(r["reward"])]
            for key in ["vs_dpo"] + (["vs_base"] if compare_to else []):
                d = r.get(key)
                fewer = f" ({d['n']} seeds)" if d and d["lo"] is not None and d["n"] < r["n"] else ""  # where both reached
                cells += [report.ci(d, signed=True) + fewer, report.verdict(d)] if d else ["-", "-"]
        lines.append("| " + " | ".join(cells + [settings_cell(r.get("settings"))]) + " |")
    return "\n".join(lines)


def chosen_table(arms, chosen, grid, variant):
    """Per arm and budget, each seed's chosen setting: beta / learning-rate factor / step of the total."""
    lines = ["| method | KL budget | " + " | ".join(f"seed {s}" for s in grid.seeds) + " |", "|" + "---|" * (2 + len(grid.seeds))]
    for arm in arms:
        for k in grid.kls:
            cells = []
            for s in grid.seeds:
                c = chosen[(arm.label, s, k, variant)]
                cells.append("-" if not c else ("" if c["beta"] is None else f"{c['beta']:g} / ") + f"×{c['lr']:g} / {c['step']}/{c['of']}")
            lines.append(f"| {arm.label} | {k:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the sweep, and what every experiment writes

def sweep(cfg, env):
    """Every method of --methods over its grid, in every seed."""
    run(cfg, env, "sweep", [Arm(m) for m in method_list(cfg)], "Every method over its grid")


def run(cfg, env, folder, arms, title, compare_to=None, note="", out=None, rescale=None):
    """measure() the arms, then write the experiment's results into out (default: folder in the run's
    folder): results.json, results.md (every table), matched_kl.md (the main table: the training
    path, held-out prompts), matched_kl_final.md, matched_kl_ood.md, chosen.md, frontier.png, and
    time.md (where the time went). rescale: as in measure(). Returns the chosen policies, every candidate, the grid and
    the tables' rows."""
    t0, times, grid, judge = time.time(), {}, grid_of(cfg), evaluate.judge_name(cfg)
    out = out or path(cfg, folder)
    if grid.quick:
        log(env, f"--quick: seeds {', '.join(map(str, grid.seeds))}, learning rate x{grid.lrs[0]:g}, the middle of each "
                 f"method's beta grid, {grid.snapshots} snapshots: intervals over two seeds are wide")
    chosen, candidates, sft = measure(cfg, env, arms, grid, times, rescale)
    if not env.master:
        return {"chosen": chosen, "candidates": candidates, "grid": grid, "tables": {}}
    tables, data = {}, {}
    for variant in VARIANTS:
        for split in ("eval", "ood"):
            rows, sft_row = summary(arms, chosen, sft, grid, judge, split, variant, compare_to)
            if any(r["n"] for r in rows):
                tables[(variant, split)] = table(rows, sft_row, judge, compare_to)
                data[f"{variant}/{split}"] = {"rows": rows, "sft": sft_row}
    files = {("path", "eval"): "matched_kl.md", ("final", "eval"): "matched_kl_final.md", ("path", "ood"): "matched_kl_ood.md"}
    for key, name in files.items():
        if key in tables:
            write_text(os.path.join(out, name), tables[key] + "\n")
    write_text(os.path.join(out, "chosen.md"), chosen_table(arms, chosen, grid, "path") + "\n")
    failed = [c for c in candidates if c.get("failed")]
    t_tables = time.time()
    report.plot_budgets(data.get("path/eval", {}).get("rows", []), os.path.join(out, "frontier.png"),
                        f"{title}: reward at each KL budget (held-out, mean and 95% CI over {len(grid.seeds)} seeds)", judge)
    times["tables and figures"] = time.time() - t_tables
    wall = time.time() - t0
    where = "\n".join(f"| {k} | {v:.0f} |" for k, v in sorted(times.items(), key=lambda kv: -kv[1]))
    text = (f"# {title}\n\n{note + chr(10) * 2 if note else ''}{describe(grid, arms, failed)}\n\n"
            + "".join(f"## {'Held-out' if split == 'eval' else 'Out-of-distribution'} prompts, {VARIANTS[variant]}\n\n"
                      f"{tables[(variant, split)]}\n\n" for variant in VARIANTS for split in ("eval", "ood")
                      if (variant, split) in tables)
            + f"## The settings each seed chose (the training path)\n\n{chosen_table(arms, chosen, grid, 'path')}\n")
    timing = (f"{title}: {wall:.0f} s of wall clock, the jobs that were up to date skipped; seconds of each kind of work, "
              f"summed over the worker processes:\n\n| work | seconds |\n|---|---|\n{where}\n")
    write_text(os.path.join(out, "results.md"), text)
    write_text(os.path.join(out, "time.md"), timing)  # a measurement of this run, not a result: apart from them
    write_json(os.path.join(out, "results.json"), {
        "judge": judge, "grid": dataclasses.asdict(grid), "window": WINDOW, "tables": data,
        "candidates": [{k: v for k, v in c.items() if k != "file"} for c in candidates], "config": as_dict(cfg)})
    print("\n" + text + "\n## Where the time went\n\n" + timing)
    log(env, f"{folder}: wrote results.md, results.json, matched_kl.md, matched_kl_final.md, matched_kl_ood.md, chosen.md, "
             f"time.md and frontier.png in {out} ({wall:.0f}s)")
    return {"chosen": chosen, "candidates": candidates, "grid": grid, "tables": data}


def describe(grid, arms, failed):
    """The instrument's settings, said in every results file."""
    betas = "; ".join(f"{m}: {', '.join('-' if b is None else f'{b:g}' for b in grid.betas(m))}"
                      for m in dict.fromkeys(a.method for a in arms))
    return (f"Seeds {', '.join(map(str, grid.seeds))} (each a whole pipeline); learning rates x{', x'.join(f'{f:g}' for f in grid.lrs)} "
            f"of each training's own; {grid.snapshots} snapshots per training, scored on the validation prompts; betas {betas}. "
            f"At a KL budget k a method's policy is its best on the validation prompts with validation KL in [k/{WINDOW:g}, k]; "
            f"the tables give that policy's held-out KL and reward (mean and 95% t-interval over the seeds that reached the "
            f"budget) and its difference from DPO's, paired by seed." + (f" {len(failed)} trainings diverged and give no "
                                                                           f"candidate." if failed else "")
            + (" --quick: two seeds, so the intervals are wide." if grid.quick else ""))
