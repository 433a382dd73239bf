"""
experiments.py: experiments that drive the pipeline's stages many times.

    python experiments.py sweep     # every method over sweep_betas x sweep_seeds -> the reward/KL frontier

Every experiment first runs (or finds up to date) the stages of train.py in --out_dir, then trains
and evaluates its policies as jobs, several at once in worker processes (--jobs), and writes
results.json, results.md, frontier.png, curves.png and the matched-KL summary into a folder of
its own. Options are train.py's (python train.py --help).
"""
import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import torch

import data
import evaluate
import packing
import records
import report
import reviews
import train
import vcb
from config import METHODS, ONLINE, STAGES, Config, ConfigError, method_list, stage_settings, sweep_list
from records import Task, file_hash, mark_done, up_to_date
from runtime import command, load_candidates, load_model, load_tokenizer, log, path, setup


# -----------------------------------------------------------------------------
# jobs: one policy each, trained (unless up to date) then sampled and scored

@dataclass
class Job:
    cfg: Config          # the run's options with this job's own (beta, lam, steps, ...)
    method: str          # one of config.METHODS, or "sft": the SFT model itself, only scored
    seed: int            # alignment batch order and evaluation samples
    name: str            # its task name in stages.json and curves.jsonl
    file: str            # the policy's checkpoint
    candidates: str = ""  # the scored candidates it learns from ("": the sample stage's)
    train: bool = True   # False: only score file (SFT, or a snapshot a training job saved)
    snapshots: dict = dataclasses.field(default_factory=dict)  # {step: file}: policies to keep along the way
    step: int = 0        # which snapshot this is (the steps ablation)


_workers = {}  # per process and run folder: the environment, tokenizer, reference models and candidates, loaded once


def worker_context(cfg, env=None):
    """What every job of this process reads in cfg's run folder: loaded at its first job there (env:
    the main process's own)."""
    key = os.path.abspath(cfg.out_dir)
    if key not in _workers:
        env = env or next((w["env"] for w in _workers.values()), None) or dataclasses.replace(setup(cfg), bars=False)
        enc = load_tokenizer(cfg)  # (a worker's progress bars would mix with the others')
        _workers[key] = dict(env=env, enc=enc, cands={}, refs=evaluate.reference_models(cfg, env, enc))
    return _workers[key]


def run_job(job, score=True):
    """Train (unless up to date) and score one policy; returns its scored samples {set: rows}."""
    w = worker_context(job.cfg)
    env, enc = w["env"], w["enc"]
    if job.train and job.method != "sft":
        task = train.align_task(job.cfg, job.method, job.seed, job.name, job.file, job.candidates or None)
        task.snapshots, task.outputs = job.snapshots, task.outputs + list(job.snapshots.values())
        if not up_to_date(job.cfg, env, task):
            file = job.candidates or path(job.cfg, "candidates.jsonl")
            key = (file, file_hash(file))  # experiments may rewrite a candidates file between runs
            if key not in w["cands"]:
                w["cands"][key] = load_candidates(job.cfg, env, enc, file)
            train.align(job.cfg, env, enc, w["cands"][key], job.method, job.seed, task)
            mark_done(job.cfg, env, task)
    return evaluate.score_policy(job.cfg, env, enc, job.method, job.file, job.seed, w["refs"]) if score else None


def run_jobs(cfg, env, jobs, score=True):
    """Every job's scored samples (score=False: only train), in order. With --jobs > 1 (auto on a CPU:
    one per core) they run in worker processes of cores / workers threads each: a small model keeps
    two threads only partly busy, so independent policies side by side use the cores better. Under
    torchrun they run in turn."""
    workers = min(cfg.jobs or (1 if env.device_type == "cuda" else os.cpu_count() or 1), len(jobs))
    if workers <= 1 or env.world > 1:
        worker_context(cfg, env)
        return [run_job(job, score) for job in jobs]
    log(env, f"{len(jobs)} jobs on {workers} worker processes")
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(max(1, torch.get_num_threads() // workers),)) as pool:
        return list(pool.map(run_job, jobs, [score] * len(jobs)))


# -----------------------------------------------------------------------------
# sweep: every method over betas and seeds

def sweep(cfg, env):
    """Align and evaluate every method for each beta in sweep_betas (ppo and rloo: sweep_online_betas)
    and seed in sweep_seeds, sharing the SFT model, the RM and the candidates (the seed changes the
    alignment batch order and the evaluation samples). RRHF has no beta and is trained once per seed."""
    seeds = sweep_list(cfg, "sweep_seeds", int)
    write_results(cfg, env, "sweep", main_grid(cfg, env, method_list(cfg)),
                  f"Reward against KL over beta, mean ± std over {len(seeds)} seeds", "Sweep")


def main_grid(cfg, env, methods):
    """The sweep's policies of these methods: what the ablations compare their variants with."""
    return policy_grid(cfg, env, "sweep", "sweep", methods, sweep_list(cfg, "sweep_betas", float),
                       sweep_list(cfg, "sweep_seeds", int), sweep_list(cfg, "sweep_online_betas", float))


def policy_grid(cfg, env, prefix, folder, methods, betas, seeds, online_betas=(), candidates="", variant=None, **overrides):
    """Every method at every beta (RRHF once: it has no beta; ppo and rloo at online_betas) and seed, plus
    SFT per seed, as jobs named prefix-method-beta-seed with their files in folder; then the metrics
    of each against SFT and DPO at the same beta and seed. A policy that the align stage of this run
    already trained (the same method, beta, seed and candidates) is reused, not trained again.
    Returns the runs [{method, beta, seed, variant, eval, ood, rows}] (rows: the scored samples, for
    the matched-KL win rates)."""
    jobs = []
    for seed in seeds:
        jobs.append(Job(cfg, "sft", seed, f"{prefix}-sft-seed{seed}", path(cfg, "sft.pt")))
        for method in methods:
            for beta in [None] if method == "rrhf" else online_betas if method in ONLINE else betas:
                sub = dataclasses.replace(cfg, beta=beta if beta is not None else cfg.beta, **overrides)
                tag = f"{method}-beta{beta:g}-seed{seed}" if beta is not None else f"{method}-seed{seed}"
                if not (candidates or overrides) and seed == cfg.seed and sub.beta == cfg.beta and method in method_list(cfg):
                    jobs.append(Job(sub, method, seed, f"align-{method}", path(cfg, f"policy_{method}.pt")))
                else:  # the variants of an ablation share its folder: their files carry the variant's prefix
                    stem = tag if variant is None else f"{prefix}-{tag}"
                    jobs.append(Job(sub, method, seed, f"{prefix}-{tag}", path(cfg, folder, f"policy_{stem}.pt"), candidates))
    keys = [(j.method, j.cfg.beta if j.method not in ("sft", "rrhf") else None, j.seed) for j in jobs]
    scored = dict(zip(keys, run_jobs(cfg, env, jobs)))
    curves = {k: (os.path.join(os.path.dirname(j.file), "curves.jsonl"), j.name) for k, j in zip(keys, jobs)}
    runs, all_betas = [], sorted(set(betas) | set(online_betas))
    for seed in seeds:
        for beta in all_betas:
            group = {m: s for (m, b, sd), s in scored.items() if sd == seed and (b == beta or b is None)}
            for method, r in evaluate.compare(cfg, env, group).items():
                if method in ("sft", "rrhf"):
                    if beta != all_betas[0]:
                        continue  # beta-free: counted once per seed, and not compared with DPO at one beta
                    r = {s: {**m, "win_rate_vs_dpo": None} for s, m in r.items()}
                b = None if method in ("sft", "rrhf") else beta
                runs.append({"method": method, "beta": b, "seed": seed, "variant": variant, **r, "rows": group[method],
                             "curve": curves[(method, b, seed)]})
    return runs


# -----------------------------------------------------------------------------
# the ablations: when do reward values matter?

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
        records = data.read_jsonl(path(cfg, "candidates.jsonl"))
        data.write_jsonl(gold, [{**r, "rewards": evaluate.gold_reward(cfg, r["responses"], [r["prompt"]] * len(r["responses"]))}
                                for r in records])
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
    enc, folder = load_tokenizer(cfg), "ablations/rm_quality"
    _, held = train.split_holdout(cfg, data.read_jsonl(path(cfg, "data", "prefs.jsonl")))  # the run's RM's held-out pairs
    quality = {"default": rm_scores_on(cfg, env, enc, path(cfg, "rm.pt"), held)}
    betas, seeds = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int)
    runs = [{**r, "variant": "default RM"} for r in main_grid(cfg, env, OFFLINE)]
    for label, prefs in RM_VARIANTS.items():
        rm_file, cands = path(cfg, folder, f"rm_{label}.pt"), path(cfg, folder, f"candidates_{label}.jsonl")
        settings = {**stage_settings(cfg, "rm"), **prefs, "variant": label}
        inputs = [path(cfg, "sft.pt"), path(cfg, "tokenizer.json"), path(cfg, "candidates.jsonl")]
        task = Task(f"rm-{label}", "rm", settings, inputs, [rm_file, cands])
        if not up_to_date(cfg, env, task):
            records = reviews.builtin_task(cfg.seed + 1, n_sft=0, n_align=0, n_eval=0, n_ood=0, **prefs)["prefs"]
            model, _ = train.train_rm(cfg, env, enc, records, task)
            train.finish(cfg, env, task, model, enc)
            rescore(cfg, env, enc, model.eval(), cands)
            mark_done(cfg, env, task)
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
        data.write_text(path(cfg, folder, "reward_models.md"), models)
    write_results(cfg, env, folder, runs, "Reward models of three qualities", "Reward-model quality",
                  extra={"reward_models": quality},
                  note=f"Each reward model judged on the run's {len(held)} held-out preference pairs:\n\n{models}")


def n_candidates(cfg, env):
    """n = 2, 4, 8, 16 candidates per prompt: the first 2 and 4 of the run's 8, the run's 8 (the sweep),
    and 16: those 8 and 8 more sampled from SFT with another seed. With n = 2 VCB sees one pair, like DPO."""
    enc, folder = load_tokenizer(cfg), "ablations/n_candidates"
    main = path(cfg, "candidates.jsonl")
    extra = path(cfg, folder, "candidates_more.jsonl")
    task = Task("more-candidates", "sample", {**stage_settings(cfg, "sample"), "seed_offset": 1}, [main], [extra])
    if not up_to_date(cfg, env, task):
        prompts = [r["prompt"] for r in data.read_jsonl(main)]
        sampled = evaluate.sample_candidates(cfg, env, enc, prompts, cfg.n_candidates, cfg.seed + 1)
        if env.master:
            data.write_jsonl(extra, sampled)
        mark_done(cfg, env, task)
    methods, betas, seeds = ["vcb", "dpo"], sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int)
    runs = [{**r, "variant": f"n={cfg.n_candidates}"} for r in main_grid(cfg, env, methods)]
    base, more = data.read_jsonl(main), data.read_jsonl(extra)
    for n in (2, 4, 2 * cfg.n_candidates):
        file = path(cfg, folder, f"candidates_{n}.jsonl")
        if env.master:
            pick = (lambda a, b: (a + b)[:n]) if n > cfg.n_candidates else (lambda a, b: a[:n])
            data.write_jsonl(file, [{k: pick(r[k], m[k]) if k != "prompt" else r[k] for k in r} for r, m in zip(base, more)])
        runs += policy_grid(cfg, env, f"n{n}", folder, methods, betas, seeds, candidates=file, variant=f"n={n}")
    write_results(cfg, env, folder, runs, "Candidates per prompt", "Candidates per prompt")


def lam(cfg, env):
    """VCB's LogSumExp temperature over a prompt's pairs: lambda = 0 (the mean), 0.1 (the default,
    the sweep), 1 and 10 (towards the worst pair)."""
    betas, seeds, folder = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int), "ablations/lam"
    runs = [{**r, "variant": f"lam={cfg.lam:g}" if r["method"] == "vcb" else None} for r in main_grid(cfg, env, ["vcb", "dpo"])]
    for value in (0.0, 1.0, 10.0):
        runs += [r for r in policy_grid(cfg, env, f"lam{value:g}", folder, ["vcb"], betas, seeds, variant=f"lam={value:g}",
                                        lam=value) if r["method"] == "vcb"]
    write_results(cfg, env, folder, runs, "VCB's lambda", "VCB's lambda (DPO, from the sweep, for reference)")


def sigma(cfg, env):
    """VCB's sigma(x) per prompt (the paper's normalisation) against one sigma for the whole candidate
    set: the reward/KL optimum has one beta for every prompt, and a per-prompt sigma spends KL unevenly."""
    betas, seeds, folder = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int), "ablations/sigma"
    runs = [{**r, "variant": "per prompt" if r["method"] == "vcb" else None} for r in main_grid(cfg, env, ["vcb", "dpo"])]
    runs += [r for r in policy_grid(cfg, env, "sigma-global", folder, ["vcb"], betas, seeds, variant="global",
                                    vcb_sigma="global") if r["method"] == "vcb"]
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
        evals.append(Job(cfg, "sft", seed, f"steps-sft-seed{seed}", path(cfg, "sft.pt"), step=0))
        for method in [m for m in method_list(cfg) if m in STEPS_BETAS]:
            beta = STEPS_BETAS[method]
            long = dataclasses.replace(cfg, beta=cfg.beta if beta is None else beta, align_steps=cfg.align_steps * factor,
                                       online_iters=cfg.online_iters * factor)
            total = long.online_iters if method in ONLINE else long.align_steps
            every = total // (2 * factor)
            tag = f"{method}-seed{seed}"
            snapshots = {s: path(cfg, folder, f"policy_{tag}-step{s}.pt") for s in range(every, total, every)}
            trains.append(Job(long, method, seed, f"steps-{tag}", path(cfg, folder, f"policy_{tag}.pt"), snapshots=snapshots))
            evals += [Job(long, method, seed, f"steps-{tag}", file, train=False, step=s)
                      for s, file in [*snapshots.items(), (total, trains[-1].file)]]
    run_jobs(cfg, env, trains, score=False)  # first every run, then every snapshot of it
    scored = run_jobs(cfg, env, evals)
    sft = {job.seed: s for job, s in zip(evals, scored) if job.method == "sft"}
    judge, rows = evaluate.judge_name(cfg), []
    for job, s in zip(evals, scored):
        if job.method != "sft":
            m = evaluate.compare(cfg, env, {"sft": sft[job.seed], job.method: s})[job.method]
            rows.append({"method": job.method, "beta": STEPS_BETAS[job.method], "seed": job.seed, "step": job.step,
                         "of": job.cfg.online_iters if job.method in ONLINE else job.cfg.align_steps, **m})
    if env.master:
        write_steps(cfg, folder, rows, judge, factor)


def write_steps(cfg, folder, rows, judge, factor):
    """The steps ablation's table (mean ± std over seeds at each fraction of the run) and curves."""
    reward, table = report.reward_key(judge), {}
    for r in rows:
        table.setdefault(r["method"], {}).setdefault(r["step"] / r["of"] * factor, []).append(r)  # in usual steps
    lines = [f"| method | beta | x the usual steps | steps | {judge} reward | KL(pi||sft) | RM reward |",
             "|---|---|---|---|---|---|---|"]
    for method, by_frac in table.items():
        for frac, group in sorted(by_frac.items()):
            g = [x["eval"] for x in group]
            lines.append(f"| {method} | {evaluate.beta_label(method, group[0]['beta'])} | {frac:.2g} | {group[0]['step']} | "
                         f"{report.fmt(report.spread([x[reward] for x in g]))} | {report.fmt(report.spread([x['kl'] for x in g]))} | "
                         f"{report.fmt(report.spread([x['rm_reward'] for x in g]))} |")
    text = "Gold reward and KL along training (mean ± std over seeds; held-out prompts):\n\n" + "\n".join(lines) + "\n"
    data.write_json(path(cfg, folder, "results.json"), {"judge": judge, "runs": rows, "config": dataclasses.asdict(cfg)})
    data.write_text(path(cfg, folder, "results.md"), text)
    print("\n" + text)
    report.plot_steps(table, path(cfg, folder, "steps.png"), judge, factor)
    report.plot_curves(path(cfg, folder, "curves.jsonl"), path(cfg, folder, "curves.png"))


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
        os.makedirs(stakes.out_dir, exist_ok=True)
        data.write_json(path(stakes, "config.json"), dataclasses.asdict(stakes))
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
            data.write_text(path(cfg, folder, "levels.md"), levels_table(runs) + "\n")
        candidate_sets += [(f"{name}, RM", path(task, "candidates.jsonl")), (f"{name}, gold", gold)]
    if env.master:
        data.write_text(path(cfg, "ablations/values/spreads.md"), spreads_table(candidate_sets) + "\n")


def spreads_table(candidate_sets):
    """sigma(x), the spread of a prompt's candidate rewards, on the prompts the stakes variant scales
    by 0.1 (reviews.LOW_STAKES) and on the others, mean ± std over prompts, for each candidate set
    [(label, file)]: whether the stakes reach the rewards a method trains on. A markdown table."""
    lines = ["| candidates | sigma(x), prompts at stake 1 | sigma(x), prompts at stake 0.1 on the stakes variant |", "|---|---|---|"]
    for label, file in candidate_sets:
        recs = data.read_jsonl(file)
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
        if r["method"] != "sft" and r.get("beta") is not None:
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


def ood(cfg, env):
    """The matched-KL summary out of distribution beside the one on held-out prompts, from the sweep's
    policies (trained here if the sweep has not run)."""
    write_results(cfg, env, "ablations/ood", main_grid(cfg, env, method_list(cfg)), "The sweep, out of distribution",
                  "Out of distribution: the sweep's policies on the restaurant prompts", split="ood")


def need_gold(cfg, name):
    if cfg.data != "builtin":
        raise ConfigError(f"experiments.py {name} needs the built-in task's gold reward (--data=builtin)")


def rescore(cfg, env, enc, rm, file):
    """The run's candidates with their rewards from another reward model, written to file."""
    records = data.read_jsonl(path(cfg, "candidates.jsonl"))
    scores = evaluate.score_rewards(cfg, env, rm, enc, [packing.encode_group(enc, r["prompt"], r["responses"]) for r in records])
    n = len(records[0]["responses"])
    if env.master:
        data.write_jsonl(file, [{**r, "rewards": scores[i * n:(i + 1) * n]} for i, r in enumerate(records)])


def rm_scores_on(cfg, env, enc, rm_file, pairs):
    """A reward model judged by the gold reward on preference pairs: how often it orders a pair as the
    gold reward does, and the correlation of its scores with the gold reward."""
    rm = load_model(rm_file, env, enc, cfg).eval()
    scores = evaluate.score_rewards(cfg, env, rm, enc, [packing.encode_group(enc, r["prompt"], [r["chosen"], r["rejected"]])
                                                        for r in pairs])
    gold = evaluate.gold_reward(cfg, [y for r in pairs for y in (r["chosen"], r["rejected"])], [r["prompt"] for r in pairs for _ in (0, 1)])
    agree = [(a > b) == (ga > gb) for a, b, ga, gb in zip(scores[0::2], scores[1::2], gold[0::2], gold[1::2]) if ga != gb]
    return {"gold_accuracy": sum(agree) / max(len(agree), 1), "gold_correlation": report.pearson(scores, gold)}


def write_results(cfg, env, folder, runs, plot_title, heading, split="eval", extra=None, note=""):
    """results.json, results.md, frontier.png and curves.png of an experiment, with the matched-KL
    summary (printed, and stored in results.json). Runs of several variants (an ablation) are
    labelled 'method (variant)'; each variant's methods are matched against its own DPO."""
    if not env.master:
        return
    judge, variants = evaluate.judge_name(cfg), list(dict.fromkeys(r.get("variant") for r in runs))
    label = lambda r: r["method"] if r.get("variant") is None or r["method"] == "sft" else f"{r['method']} ({r['variant']})"  # noqa: E731
    order = ["sft"] + METHODS  # rows in the order of config.METHODS, each variant's after the other, betas rising
    runs = sorted(runs, key=lambda r: (order.index(r["method"]), variants.index(r.get("variant")), r["beta"] or 0, r["seed"]))
    seen, labelled = set(), []
    for r in runs:  # SFT is the same model in every variant: once
        if (label(r), r["beta"], r["seed"]) not in seen:
            seen.add((label(r), r["beta"], r["seed"]))
            labelled.append({**r, "method": label(r), "base": r["method"]})
    plain = [{k: v for k, v in r.items() if k not in ("rows", "base", "curve")} for r in labelled]
    summary = report.summarise(plain)
    matched = {}
    for s in ("eval", "ood"):
        for v in variants:
            mine = [{**r, "method": r["base"]} for r in labelled if r.get("variant") == v and r["base"] != "sft"]
            borrowed = [] if any(r["method"] == "dpo" for r in mine) else \
                [{**r, "method": r["base"]} for r in labelled if r.get("variant") is None and r["base"] == "dpo"]
            for method, cells in report.matched_kl(mine + borrowed, judge, split=s).items():
                if not (borrowed and method == "dpo"):  # a variant without DPO of its own is matched against the plain one
                    matched.setdefault(s, {})[label({"method": method, "variant": v})] = cells
    data.write_json(path(cfg, folder, "results.json"), {
        "judge": judge, "runs": plain, "summary": summary, **(extra or {}),
        "matched_kl": {s: {m: {f"{kl:g}": c for kl, c in cells.items()} for m, cells in by.items()} for s, by in matched.items()},
        "config": dataclasses.asdict(cfg)})
    table = report.results_table({m: {evaluate.beta_label(m.split(" ")[0], b): r for b, r in by_beta.items()}
                                  for m, by_beta in summary.items()}, judge)
    order = [split] + [s for s in matched if s != split]
    text = (f"{heading} (mean ± std over seeds; win vs DPO at the same beta):\n\n{note + chr(10) * 2 if note else ''}{table}\n\n"
            + "".join(f"Reward at matched KL ({'held-out' if s == 'eval' else 'out-of-distribution'} prompts; interpolated "
                      f"along each method's beta curve, per seed):\n\n{report.matched_kl_table(matched[s], judge)}\n\n"
                      for s in order if s in matched))
    data.write_text(path(cfg, folder, "results.md"), text)
    data.write_text(path(cfg, folder, "table.md"), table + "\n")  # the pieces docs/ copies in (python report.py)
    for s, name in (("eval", "matched_kl.md"), ("ood", "matched_kl_ood.md")):
        if s in matched:
            data.write_text(path(cfg, folder, name), report.matched_kl_table(matched[s], judge) + "\n")
    print("\n" + text)
    reward = report.reward_key(judge)
    points = [dict(method=m, beta=b, kl=r[split]["kl"][0], kl_std=r[split]["kl"][1], reward=r[split][reward][0],
                   reward_std=r[split][reward][1]) for m, by_beta in summary.items() for b, r in by_beta.items() if split in r]
    report.plot_frontier(points, path(cfg, folder, "frontier.png"), plot_title, judge)
    report.plot_curves(path(cfg, folder, "curves.jsonl"), path(cfg, folder, "curves.png"))
    log(env, f"{folder}: wrote {path(cfg, folder, 'results.json')}, results.md, frontier.png and curves.png")


EXPERIMENTS = {"sweep": sweep, "reward_source": reward_source, "rm_quality": rm_quality, "n_candidates": n_candidates,
               "lam": lam, "steps": steps, "sigma": sigma, "ood": ood, "values": values}


def every(cfg, env):
    """The sweep, then every ablation."""
    for name, run in list(EXPERIMENTS.items()):
        if name != "all":
            run(cfg, env)


EXPERIMENTS["all"] = every


def main(argv):
    if not argv or argv[0] not in EXPERIMENTS:
        raise ConfigError(f"usage: python experiments.py NAME [--key=value ...], NAME one of {', '.join(EXPERIMENTS)}")
    train.main(argv[1:], then=EXPERIMENTS[argv[0]], doc=__doc__)


if __name__ == "__main__":
    command(main)
