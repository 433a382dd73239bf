"""
experiments/harness.py: what every experiment stands on. A job is one policy, trained (unless up to
date) and then sampled and scored; jobs run several at once in worker processes (--jobs); a grid of
jobs is every method over its betas and seeds; write_results turns the scored runs into an
experiment's results.json, results.md, frontier.png, curves.png and the matched-KL summary.

Every experiment first runs (or finds up to date) the stages of train.py in --out_dir, and writes
into a folder of its own. The experiments are in experiments/__main__.py (python -m experiments).
"""
import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context

import torch

import evaluate
import train
from evaluate import BASELINE, SFT
from experiments import report
from machinery import processes, records
from machinery.config import METHODS, Config, ConfigError, as_dict, method_list, sweep_list
from machinery.files import write_json, write_text
from machinery.records import file_hash
from machinery.runtime import TrainingError, log, path, setup
from vcb import METHODS as REGISTRY


def has_beta(name):
    """Whether the policy `name` (a method, or SFT) has a beta: SFT and RRHF have none."""
    return name in REGISTRY and REGISTRY[name].beta


# -----------------------------------------------------------------------------
# jobs: one policy each, trained (unless up to date) then sampled and scored

@dataclass
class Job:
    cfg: Config          # the run's options with this job's own (beta, lam, steps, ...)
    method: str          # a method of vcb.METHODS, or SFT: the SFT model itself, only scored
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
        enc = train.tokenizer(cfg)  # (a worker's progress bars would mix with the others')
        _workers[key] = dict(env=env, enc=enc, cands={}, refs=evaluate.reference_models(cfg, env, enc))
    return _workers[key]


def run_job(job, score=True):
    """Train (unless up to date) and score one policy; returns its scored samples {set: rows}."""
    w = worker_context(job.cfg)
    env, enc = w["env"], w["enc"]
    if job.train:
        task = train.align_task(job.cfg, job.method, job.seed, job.name, job.file, job.candidates or None)
        task.snapshots, task.outputs = job.snapshots, task.outputs + list(job.snapshots.values())

        def work():
            file = job.candidates or path(job.cfg, "candidates.jsonl")
            key = (file, file_hash(file))  # experiments may rewrite a candidates file between runs
            if key not in w["cands"]:
                w["cands"][key] = train.candidates(job.cfg, env, enc, file)
            train.align(job.cfg, env, enc, w["cands"][key], job.method, job.seed, task)
        records.run(job.cfg, env, task, work)
    return evaluate.score_policy(job.cfg, env, enc, job.method, job.file, job.seed, w["refs"]) if score else None


def run_jobs(cfg, env, jobs, score=True):
    """Every job's scored samples (score=False: only train), in order. With --jobs > 1 (auto on a CPU:
    one per core) they run in worker processes of cores / workers threads each: a small model keeps
    two threads only partly busy, so independent policies side by side use the cores better. Under
    torchrun they run in turn. The workers die with this process, whatever kills it (worker_init); a
    worker that dies is one line, and what it finished is kept."""
    workers = min(cfg.jobs or (1 if env.device_type == "cuda" else os.cpu_count() or 1), len(jobs))
    if workers <= 1 or env.world > 1:
        worker_context(cfg, env)
        return [run_job(job, score) for job in jobs]
    log(env, f"{len(jobs)} jobs on {workers} worker processes")
    with worker_pool(workers) as pool:
        try:
            return list(pool.map(run_job, jobs, [score] * len(jobs)))
        except BrokenProcessPool:
            raise TrainingError("a worker process of the experiment died (killed, perhaps by the system for lack of memory): "
                                "the policies it finished are kept; run the same command again to go on") from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the jobs not started yet are dropped, not waited for
            raise


def worker_pool(workers):
    """The worker processes, started afresh (spawn: a forked copy of a process with threads can hang),
    each with cores / workers threads; they die with this process (worker_init)."""
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=worker_init,
                               initargs=(os.getpid(), max(1, torch.get_num_threads() // workers)))


def worker_init(parent, threads):
    """First thing in a worker process: die with the parent, whatever kills it (processes.lifeline),
    and take a share of the cores."""
    processes.lifeline(parent)
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# grids of policies: every method over its betas and seeds

def main_grid(cfg, env, methods):
    """The sweep's policies of these methods: what the ablations compare their variants with."""
    return policy_grid(cfg, env, "sweep", "sweep", methods, sweep_list(cfg, "sweep_betas", float),
                       sweep_list(cfg, "sweep_seeds", int), sweep_list(cfg, "sweep_online_betas", float))


def policy_grid(cfg, env, prefix, folder, methods, betas, seeds, online_betas=(), candidates="", variant=None, **overrides):
    """Every method at every beta (once if it has none; the online ones at online_betas) and seed, plus
    SFT per seed, as jobs named prefix-method-beta-seed with their files in folder; then the metrics
    of each against SFT and DPO at the same beta and seed. A policy that the align stage of this run
    already trained (the same method, beta, seed and candidates) is reused, not trained again.
    Returns the runs [{method, beta, seed, variant, eval, ood, rows}] (rows: the scored samples, for
    the matched-KL win rates)."""
    jobs = []
    for seed in seeds:
        jobs.append(Job(cfg, SFT, seed, f"{prefix}-sft-seed{seed}", path(cfg, "sft.pt"), train=False))
        for method in methods:
            for beta in online_betas if REGISTRY[method].online else betas if has_beta(method) else [None]:
                sub = dataclasses.replace(cfg, beta=beta if beta is not None else cfg.beta, **overrides)
                tag = f"{method}-beta{beta:g}-seed{seed}" if beta is not None else f"{method}-seed{seed}"
                if not (candidates or overrides) and seed == cfg.seed and sub.beta == cfg.beta and method in method_list(cfg):
                    jobs.append(Job(sub, method, seed, f"align-{method}", path(cfg, f"policy_{method}.pt")))
                else:  # the variants of an ablation share its folder: their files carry the variant's prefix
                    stem = tag if variant is None else f"{prefix}-{tag}"
                    jobs.append(Job(sub, method, seed, f"{prefix}-{tag}", path(cfg, folder, f"policy_{stem}.pt"), candidates))
    keys = [(j.method, j.cfg.beta if has_beta(j.method) else None, j.seed) for j in jobs]
    scored = dict(zip(keys, run_jobs(cfg, env, jobs)))
    curves = {k: (os.path.join(os.path.dirname(j.file), "curves.jsonl"), j.name) for k, j in zip(keys, jobs)}
    runs, all_betas = [], sorted(set(betas) | set(online_betas))
    for seed in seeds:
        for beta in all_betas:
            group = {m: s for (m, b, sd), s in scored.items() if sd == seed and (b == beta or b is None)}
            for method, r in evaluate.compare(cfg, env, group).items():
                if not has_beta(method):
                    if beta != all_betas[0]:
                        continue  # beta-free: counted once per seed, and not compared with DPO at one beta
                    r = {s: {**m, "win_rate_vs_dpo": None} for s, m in r.items()}
                b = beta if has_beta(method) else None
                runs.append({"method": method, "beta": b, "seed": seed, "variant": variant, **r, "rows": group[method],
                             "curve": curves[(method, b, seed)]})
    return runs


def need_gold(cfg, name):
    if cfg.data != "builtin":
        raise ConfigError(f"python -m experiments {name} needs the built-in task's gold reward (--data=builtin)")


# -----------------------------------------------------------------------------
# an experiment's results: tables, figures, the matched-KL summary

def write_results(cfg, env, folder, runs, plot_title, heading, split="eval", extra=None, note=""):
    """results.json, results.md, frontier.png and curves.png of an experiment, with the matched-KL
    summary (printed, and stored in results.json). Runs of several variants (an ablation) are
    labelled 'method (variant)'; each variant's methods are matched against its own DPO."""
    if not env.master:
        return
    judge, variants = evaluate.judge_name(cfg), list(dict.fromkeys(r.get("variant") for r in runs))
    label = lambda r: r["method"] if r.get("variant") is None or r["method"] == SFT else f"{r['method']} ({r['variant']})"  # noqa: E731
    order = [SFT] + METHODS  # rows in the order of vcb.METHODS, each variant's after the other, betas rising
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
            mine = [{**r, "method": r["base"]} for r in labelled if r.get("variant") == v and r["base"] != SFT]
            borrowed = [] if any(r["method"] == BASELINE for r in mine) else \
                [{**r, "method": r["base"]} for r in labelled if r.get("variant") is None and r["base"] == BASELINE]
            for method, cells in report.matched_kl(mine + borrowed, judge, split=s, baseline=BASELINE).items():
                if not (borrowed and method == BASELINE):  # a variant without DPO of its own is matched against the plain one
                    matched.setdefault(s, {})[label({"method": method, "variant": v})] = cells
    write_json(path(cfg, folder, "results.json"), {
        "judge": judge, "runs": plain, "summary": summary, **(extra or {}),
        "matched_kl": {s: {m: {f"{kl:g}": c for kl, c in cells.items()} for m, cells in by.items()} for s, by in matched.items()},
        "config": as_dict(cfg)})
    table = report.results_table({m: {report.beta_label(m.split(" ")[0], b): r for b, r in by_beta.items()}
                                  for m, by_beta in summary.items()}, judge)
    order = [split] + [s for s in matched if s != split]
    text = (f"{heading} (mean ± std over seeds; win vs DPO at the same beta):\n\n{note + chr(10) * 2 if note else ''}{table}\n\n"
            + "".join(f"Reward at matched KL ({'held-out' if s == 'eval' else 'out-of-distribution'} prompts; interpolated "
                      f"along each method's beta curve, per seed):\n\n{report.matched_kl_table(matched[s], judge)}\n\n"
                      for s in order if s in matched))
    write_text(path(cfg, folder, "results.md"), text)
    write_text(path(cfg, folder, "table.md"), table + "\n")  # the pieces docs/ copies in (python -m experiments.report)
    for s, name in (("eval", "matched_kl.md"), ("ood", "matched_kl_ood.md")):
        if s in matched:
            write_text(path(cfg, folder, name), report.matched_kl_table(matched[s], judge) + "\n")
    print("\n" + text)
    reward = evaluate.reward_key(judge)
    points = [dict(method=m, beta=b, kl=r[split]["kl"][0], kl_std=r[split]["kl"][1], reward=r[split][reward][0],
                   reward_std=r[split][reward][1]) for m, by_beta in summary.items() for b, r in by_beta.items() if split in r]
    report.plot_frontier(points, path(cfg, folder, "frontier.png"), plot_title, judge)
    report.plot_curves(path(cfg, folder, "curves.jsonl"), path(cfg, folder, "curves.png"))
    log(env, f"{folder}: wrote {path(cfg, folder, 'results.json')}, results.md, frontier.png and curves.png")
