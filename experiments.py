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
import report
import train
from config import ONLINE, Config, ConfigError, method_list, sweep_list
from runtime import command, file_hash, load_candidates, load_tokenizer, log, path, setup, up_to_date


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


_worker = {}  # per process: the environment, tokenizer, reference models and candidates, loaded once


def worker_context(cfg, env=None):
    """What every job of this process reads: loaded at its first job (env: the main process's own)."""
    if "enc" not in _worker:
        env = env or dataclasses.replace(setup(cfg), bars=False)  # a worker's bars would mix with the others'
        enc = load_tokenizer(cfg)
        _worker.update(env=env, enc=enc, cands={}, refs=evaluate.reference_models(cfg, env, enc))
    return _worker


def run_job(job):
    """Train (unless up to date) and score one policy; returns its scored samples {set: rows}."""
    w = worker_context(job.cfg)
    env, enc = w["env"], w["enc"]
    if job.method != "sft":
        task = train.align_task(job.cfg, job.method, job.seed, job.name, job.file, job.candidates or None)
        if not up_to_date(job.cfg, env, task):
            file = job.candidates or path(job.cfg, "candidates.jsonl")
            key = (file, file_hash(file))  # experiments may rewrite a candidates file between runs
            if key not in w["cands"]:
                w["cands"][key] = load_candidates(job.cfg, env, enc, file)
            train.align(job.cfg, env, enc, w["cands"][key], job.method, job.seed, task)
    return evaluate.score_policy(job.cfg, env, enc, job.method, job.file, job.seed, w["refs"])


def run_jobs(cfg, env, jobs):
    """Every job's scored samples, in order. With --jobs > 1 (auto on a CPU: one per core) they run in
    worker processes of cores / workers threads each: a small model keeps two threads only partly
    busy, so independent policies side by side use the cores better. Under torchrun they run in turn."""
    workers = min(cfg.jobs or (1 if env.device_type == "cuda" else os.cpu_count() or 1), len(jobs))
    if workers <= 1 or env.world > 1:
        worker_context(cfg, env)
        return [run_job(job) for job in jobs]
    log(env, f"{len(jobs)} jobs on {workers} worker processes")
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(max(1, torch.get_num_threads() // workers),)) as pool:
        return list(pool.map(run_job, jobs))


# -----------------------------------------------------------------------------
# sweep: every method over betas and seeds

def sweep(cfg, env):
    """Align and evaluate every method for each beta in sweep_betas and seed in sweep_seeds, sharing
    the SFT model, the RM and the candidates (the seed changes the alignment batch order and the
    evaluation samples). RRHF has no beta and is trained once per seed."""
    betas, seeds = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int)
    online_betas = sweep_list(cfg, "sweep_online_betas", float)
    runs = policy_grid(cfg, env, "sweep", method_list(cfg), betas, seeds, online_betas)
    write_results(cfg, env, "sweep", runs, f"Reward against KL over beta, mean ± std over {len(seeds)} seeds",
                  f"Sweep over beta in {betas}, seeds {seeds}")


def policy_grid(cfg, env, folder, methods, betas, seeds, online_betas=(), candidates="", **overrides):
    """Every method at every beta (RRHF once: it has no beta; ppo and rloo at online_betas) and seed, plus
    SFT per seed, as jobs; then the metrics of each against SFT and DPO at the same beta and seed.
    Returns the runs [{method, beta, seed, eval, ood, rows}] (rows: the scored samples, for the
    matched-KL win rates)."""
    jobs = []
    for seed in seeds:
        jobs.append(Job(cfg, "sft", seed, f"{folder}-sft-seed{seed}", path(cfg, "sft.pt")))
        for method in methods:
            for beta in [None] if method == "rrhf" else online_betas if method in ONLINE else betas:
                sub = dataclasses.replace(cfg, beta=beta if beta is not None else cfg.beta, **overrides)
                tag = f"{method}-beta{beta:g}-seed{seed}" if beta is not None else f"{method}-seed{seed}"
                jobs.append(Job(sub, method, seed, f"{folder}-{tag}", path(cfg, folder, f"policy_{tag}.pt"), candidates))
    scored = dict(zip([(j.method, j.cfg.beta if j.method not in ("sft", "rrhf") else None, j.seed) for j in jobs],
                      run_jobs(cfg, env, jobs)))
    runs = []
    for seed in seeds:
        for beta in sorted(set(betas) | set(online_betas)):
            group = {m: s for (m, b, sd), s in scored.items() if sd == seed and (b == beta or b is None)}
            for method, r in evaluate.compare(cfg, env, group).items():
                if method in ("sft", "rrhf"):
                    if beta != sorted(set(betas) | set(online_betas))[0]:
                        continue  # beta-free: counted once per seed, and not compared with DPO at one beta
                    r = {s: {**m, "win_rate_vs_dpo": None} for s, m in r.items()}
                b = None if method in ("sft", "rrhf") else beta
                runs.append({"method": method, "beta": b, "seed": seed, **r, "rows": group[method]})
    return runs


def write_results(cfg, env, folder, runs, plot_title, heading):
    """results.json, results.md, frontier.png and curves.png of an experiment, and the matched-KL
    summary (printed, and stored in results.json)."""
    if not env.master:
        return
    judge = evaluate.judge_name(cfg)
    summary = report.summarise([{k: v for k, v in r.items() if k != "rows"} for r in runs])
    matched = {s: report.matched_kl(runs, judge, split=s) for s in ("eval", "ood") if any(s in r for r in runs)}
    data.write_json(path(cfg, folder, "results.json"), {
        "judge": judge, "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs], "summary": summary,
        "matched_kl": {s: {m: {f"{kl:g}": c for kl, c in cells.items()} for m, cells in by.items()} for s, by in matched.items()},
        "config": dataclasses.asdict(cfg)})
    table = report.results_table({m: {evaluate.beta_label(m, b): r for b, r in by_beta.items()}
                                  for m, by_beta in summary.items()}, judge)
    kl_tables = {s: report.matched_kl_table(m, judge) for s, m in matched.items()}
    text = (f"{heading} (mean ± std over seeds; win vs DPO at the same beta):\n\n{table}\n\n"
            + "".join(f"Reward at matched KL ({'held-out' if s == 'eval' else 'out-of-distribution'} prompts; "
                      f"interpolated along each method's beta curve, per seed):\n\n{t}\n\n" for s, t in kl_tables.items()))
    data.write_text(path(cfg, folder, "results.md"), text)
    print("\n" + text)
    reward = report.reward_key(judge)
    points = [dict(method=m, beta=b, kl=r["eval"]["kl"][0], kl_std=r["eval"]["kl"][1], reward=r["eval"][reward][0],
                   reward_std=r["eval"][reward][1]) for m, by_beta in summary.items() for b, r in by_beta.items()]
    report.plot_frontier(points, path(cfg, folder, "frontier.png"), plot_title, judge)
    report.plot_curves(path(cfg, folder, "curves.jsonl"), path(cfg, folder, "curves.png"))
    log(env, f"{folder}: wrote {path(cfg, folder, 'results.json')}, results.md, frontier.png and curves.png")


EXPERIMENTS = {"sweep": sweep}


def main(argv):
    if not argv or argv[0] not in EXPERIMENTS:
        raise ConfigError(f"usage: python experiments.py NAME [--key=value ...], NAME one of {', '.join(EXPERIMENTS)}")

    train.main(argv[1:], then=EXPERIMENTS[argv[0]], doc=__doc__)


if __name__ == "__main__":
    command(main)
