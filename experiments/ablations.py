"""
experiments/ablations.py: when do reward values matter? Each ablation varies one thing against the
sweep's policies (experiments/harness.py runs the jobs and writes the tables):

    reward_source   candidates scored by the reward model, or by the gold reward itself
    rm_quality      a weaker and a stronger reward model rescoring the same candidates
    n_candidates    2, 4, 8 or 16 candidates per prompt
    lam, sigma      VCB's LogSumExp temperature, and its sigma(x) per prompt or for the whole set
    steps           reward and KL along training, out to steps_factor times the steps
    ood             the sweep's policies on the out-of-distribution prompts
"""
import dataclasses

import data
import evaluate
import train
from experiments import report
from experiments.harness import SFT, Job, main_grid, need_gold, policy_grid, run_jobs, write_results
from machinery import records
from machinery.config import as_dict, method_list, sweep_list
from machinery.files import read_jsonl, write_json, write_jsonl, write_text
from machinery.progress import finish_task
from machinery.records import Task
from machinery.runtime import load_model, path
from tasks import reviews
from vcb import METHODS


OFFLINE = ["vcb", "dpo", "ipo", "slic"]  # the methods that learn from scored candidates and have a beta


def reward_source(cfg, env):
    """Candidates scored by the reward model (the sweep's) against the same candidates scored by the
    gold reward itself, an oracle reward model: what each method gains from exact reward values."""
    need_gold(cfg, "reward_source")
    gold = gold_candidates(cfg, env, "ablations/reward_source")
    betas, seeds = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int)
    runs = [{**r, "variant": "RM"} for r in main_grid(cfg, env, OFFLINE + ["rrhf"])]
    runs += policy_grid(cfg, env, "gold", "ablations/reward_source", OFFLINE + ["rrhf"], betas, seeds, candidates=gold,
                        variant="gold")
    write_results(cfg, env, "ablations/reward_source", runs, "Candidates scored by the RM or by the gold reward",
                  "Reward source: the RM's scores (the sweep) against the gold reward's (an oracle RM)")


def gold_candidates(cfg, env, folder):
    """The run's candidates scored by the gold reward itself (an oracle reward model), in folder."""
    gold = path(cfg, folder, "candidates_gold.jsonl")
    if env.master:
        recs = read_jsonl(path(cfg, "candidates.jsonl"))
        write_jsonl(gold, [{**r, "rewards": evaluate.gold_reward(cfg, r["responses"], [r["prompt"]] * len(r["responses"]))}
                           for r in recs])
    return gold


RM_VARIANTS = {  # label -> the preference data of its reward model (the default: 3000 pairs at pref_tau 0.25)
    "weak": dict(n_prefs=500, pref_tau=1.0),     # fewer pairs, noisier labels
    "strong": dict(n_prefs=3000, pref_tau=0.05),  # nearly noiseless labels
}


def rm_quality(cfg, env):
    """A weaker and a stronger reward model than the run's, each rescoring the same candidates; every
    RM's accuracy against the gold order and its correlation with the gold reward on the run's
    held-out preference pairs, beside each method's matched-KL reward."""
    need_gold(cfg, "rm_quality")
    enc, folder = train.tokenizer(cfg), "ablations/rm_quality"
    _, held = train.split_holdout(cfg, read_jsonl(path(cfg, "data", "prefs.jsonl")))  # the run's RM's held-out pairs
    quality = {"default": rm_scores_on(cfg, env, enc, path(cfg, "rm.pt"), held)}
    betas, seeds = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int)
    runs = [{**r, "variant": "default RM"} for r in main_grid(cfg, env, OFFLINE)]
    for label, prefs in RM_VARIANTS.items():
        rm_file, cands = path(cfg, folder, f"rm_{label}.pt"), path(cfg, folder, f"candidates_{label}.jsonl")
        inputs = [path(cfg, "sft.pt"), path(cfg, "tokenizer.json"), path(cfg, "candidates.jsonl")]
        task = Task(f"rm-{label}", "rm", inputs, [rm_file, cands], extra={"variant": label, **prefs})

        def work():
            prefs_data = reviews.builtin_task(cfg.seed + 1, n_sft=0, n_align=0, n_eval=0, n_ood=0, **prefs)["prefs"]
            model, _ = train.train_rm(cfg, env, enc, prefs_data, task)
            finish_task(cfg, env, task, model, enc)
            rescore(cfg, env, model.eval(), cands)
        records.run(cfg, env, task, work)
        quality[label] = rm_scores_on(cfg, env, enc, rm_file, held)
        runs += policy_grid(cfg, env, f"rm_{label}", folder, OFFLINE, betas, seeds, candidates=cands, variant=f"{label} RM")
    lines = ["| reward model | preference data | accuracy against the gold order | correlation with the gold reward |",
             "|---|---|---|---|"]
    for k, q in quality.items():
        prefs = RM_VARIANTS.get(k, dict(n_prefs=cfg.n_prefs, pref_tau=cfg.pref_tau))
        lines.append(f"| {k} | {prefs['n_prefs']} pairs, pref_tau {prefs['pref_tau']:g} | {q['gold_accuracy']:.3f} | "
                     f"{q['gold_correlation']:.3f} |")
    models = "\n".join(lines) + "\n"
    if env.master:
        write_text(path(cfg, folder, "reward_models.md"), models)
    write_results(cfg, env, folder, runs, "Reward models of three qualities", "Reward-model quality",
                  extra={"reward_models": quality},
                  note=f"Each reward model judged on the run's {len(held)} held-out preference pairs:\n\n{models}")


def n_candidates(cfg, env):
    """n = 2, 4, 8, 16 candidates per prompt: the first 2 and 4 of the run's 8, the run's 8 (the sweep),
    and 16: those 8 and 8 more sampled from SFT with another seed. With n = 2 VCB sees one pair, like DPO."""
    enc, folder = train.tokenizer(cfg), "ablations/n_candidates"
    main = path(cfg, "candidates.jsonl")
    extra = path(cfg, folder, "candidates_more.jsonl")
    task = Task("more-candidates", "sample", [main], [extra], extra={"seed_offset": 1})

    def work():
        prompts = [r["prompt"] for r in read_jsonl(main)]
        sampled = evaluate.sample_candidates(cfg, env, enc, prompts, cfg.n_candidates, cfg.seed + 1)
        if env.master:
            write_jsonl(extra, sampled)
    records.run(cfg, env, task, work)
    methods, betas, seeds = ["vcb", "dpo"], sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int)
    runs = [{**r, "variant": f"n={cfg.n_candidates}"} for r in main_grid(cfg, env, methods)]
    base, more = read_jsonl(main), read_jsonl(extra)
    for n in (2, 4, 2 * cfg.n_candidates):
        file = path(cfg, folder, f"candidates_{n}.jsonl")
        if env.master:
            pick = (lambda a, b: (a + b)[:n]) if n > cfg.n_candidates else (lambda a, b: a[:n])
            write_jsonl(file, [{k: pick(r[k], m[k]) if k != "prompt" else r[k] for k in r} for r, m in zip(base, more)])
        runs += policy_grid(cfg, env, f"n{n}", folder, methods, betas, seeds, candidates=file, variant=f"n={n}")
    write_results(cfg, env, folder, runs, "Candidates per prompt", "Candidates per prompt")


def lam(cfg, env):
    """VCB's LogSumExp temperature over a prompt's pairs: lambda = 0 (the mean), 0.1 (the default,
    the sweep), 1 and 10 (towards the worst pair)."""
    betas, seeds, folder = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int), "ablations/lam"
    runs = [{**r, "variant": f"lam={cfg.lam:g}" if r["method"] == "vcb" else None} for r in main_grid(cfg, env, ["vcb", "dpo"])]
    for value in (0.0, 1.0, 10.0):
        runs += [r for r in policy_grid(cfg, env, f"lam{value:g}", folder, ["vcb"], betas, seeds, variant=f"lam={value:g}",
                                        lam=value) if r["method"] != SFT]
    write_results(cfg, env, folder, runs, "VCB's lambda", "VCB's lambda (DPO, from the sweep, for reference)")


def sigma(cfg, env):
    """VCB's sigma(x) per prompt (the paper's normalisation) against one sigma for the whole candidate
    set: the reward/KL optimum has one beta for every prompt, and a per-prompt sigma spends KL unevenly."""
    betas, seeds, folder = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int), "ablations/sigma"
    runs = [{**r, "variant": "per prompt" if r["method"] == "vcb" else None} for r in main_grid(cfg, env, ["vcb", "dpo"])]
    runs += [r for r in policy_grid(cfg, env, "sigma-global", folder, ["vcb"], betas, seeds, variant="global",
                                    vcb_sigma="global") if r["method"] != SFT]
    write_results(cfg, env, folder, runs, "VCB's sigma: per prompt or global", "VCB's sigma(x) (DPO, from the sweep, for reference)")


STEPS_BETAS = {"vcb": 0.3, "dpo": 1.0, "ipo": 0.1, "slic": 1.0, "rrhf": None, "ppo": 0.1, "rloo": 0.1}  # KL about 2 to 6 at 60 steps


def steps(cfg, env):
    """Gold reward and KL along training, out to steps_factor times the steps, for each method at one
    beta (STEPS_BETAS: the run's methods that have one) and every seed: which methods settle, which
    over-optimise, and where VCB sits once it has reached its own targets. Each run saves its policy
    every 1/(2 steps_factor) of the way."""
    factor, folder, seeds = cfg.steps_factor, "ablations/steps", sweep_list(cfg, "sweep_seeds", int)
    trains, evals = [], []
    for seed in seeds:
        evals.append(Job(cfg, SFT, seed, f"steps-sft-seed{seed}", path(cfg, "sft.pt"), train=False, step=0))
        for method in [m for m in method_list(cfg) if m in STEPS_BETAS]:
            beta = STEPS_BETAS[method]
            long = dataclasses.replace(cfg, beta=cfg.beta if beta is None else beta, align_steps=cfg.align_steps * factor,
                                       online_iters=cfg.online_iters * factor)
            total = long.online_iters if METHODS[method].online else long.align_steps
            every = total // (2 * factor)
            tag = f"{method}-seed{seed}"
            snapshots = {s: path(cfg, folder, f"policy_{tag}-step{s}.pt") for s in range(every, total, every)}
            trains.append(Job(long, method, seed, f"steps-{tag}", path(cfg, folder, f"policy_{tag}.pt"), snapshots=snapshots))
            evals += [Job(long, method, seed, f"steps-{tag}", file, train=False, step=s)
                      for s, file in [*snapshots.items(), (total, trains[-1].file)]]
    run_jobs(cfg, env, trains, score=False)  # first every run, then every snapshot of it
    scored = run_jobs(cfg, env, evals)
    sft = {job.seed: s for job, s in zip(evals, scored) if job.method == SFT}
    judge, rows = evaluate.judge_name(cfg), []
    for job, s in zip(evals, scored):
        if job.method != SFT:
            m = evaluate.compare(cfg, env, {SFT: sft[job.seed], job.method: s})[job.method]
            rows.append({"method": job.method, "beta": STEPS_BETAS[job.method], "seed": job.seed, "step": job.step,
                         "of": job.cfg.online_iters if METHODS[job.method].online else job.cfg.align_steps, **m})
    if env.master:
        write_steps(cfg, folder, rows, judge, factor)


def write_steps(cfg, folder, rows, judge, factor):
    """The steps ablation's table (mean ± std over seeds at each fraction of the run) and curves."""
    reward, table = evaluate.reward_key(judge), {}
    for r in rows:
        table.setdefault(r["method"], {}).setdefault(r["step"] / r["of"] * factor, []).append(r)  # in usual steps
    lines = [f"| method | beta | x the usual steps | steps | {judge} reward | KL(pi||sft) | RM reward |",
             "|---|---|---|---|---|---|---|"]
    for method, by_frac in table.items():
        for frac, group in sorted(by_frac.items()):
            g = [x["eval"] for x in group]
            lines.append(f"| {method} | {report.beta_label(method, group[0]['beta'])} | {frac:.2g} | {group[0]['step']} | "
                         f"{report.fmt(report.spread([x[reward] for x in g]))} | {report.fmt(report.spread([x['kl'] for x in g]))} | "
                         f"{report.fmt(report.spread([x['rm_reward'] for x in g]))} |")
    text = "Gold reward and KL along training (mean ± std over seeds; held-out prompts):\n\n" + "\n".join(lines) + "\n"
    write_json(path(cfg, folder, "results.json"), {"judge": judge, "runs": rows, "config": as_dict(cfg)})
    write_text(path(cfg, folder, "results.md"), text)
    print("\n" + text)
    report.plot_steps(table, path(cfg, folder, "steps.png"), judge, factor)
    report.plot_curves(path(cfg, folder, "curves.jsonl"), path(cfg, folder, "curves.png"))


def ood(cfg, env):
    """The matched-KL summary out of distribution beside the one on held-out prompts, from the sweep's
    policies (trained here if the sweep has not run)."""
    write_results(cfg, env, "ablations/ood", main_grid(cfg, env, method_list(cfg)), "The sweep, out of distribution",
                  "Out of distribution: the sweep's policies on the restaurant prompts", split="ood")


def rescore(cfg, env, rm, file):
    """The run's candidates with their rewards from another reward model, written to file."""
    enc = train.tokenizer(cfg)
    recs = read_jsonl(path(cfg, "candidates.jsonl"))
    scores = evaluate.score_rewards(cfg, env, rm, [data.encode_group(enc, r["prompt"], r["responses"]) for r in recs])
    n = len(recs[0]["responses"])
    if env.master:
        write_jsonl(file, [{**r, "rewards": scores[i * n:(i + 1) * n]} for i, r in enumerate(recs)])


def rm_scores_on(cfg, env, enc, rm_file, pairs):
    """A reward model judged by the gold reward on preference pairs: how often it orders a pair as the
    gold reward does, and the correlation of its scores with the gold reward."""
    rm = load_model(rm_file, env, enc, cfg).eval()
    scores = evaluate.score_rewards(cfg, env, rm, [data.encode_group(enc, r["prompt"], [r["chosen"], r["rejected"]])
                                                   for r in pairs])
    gold = evaluate.gold_reward(cfg, [y for r in pairs for y in (r["chosen"], r["rejected"])], [r["prompt"] for r in pairs for _ in (0, 1)])
    agree = [(a > b) == (ga > gb) for a, b, ga, gb in zip(scores[0::2], scores[1::2], gold[0::2], gold[1::2]) if ga != gb]
    return {"gold_accuracy": sum(agree) / max(len(agree), 1), "gold_correlation": report.pearson(scores, gold)}
