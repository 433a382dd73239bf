"""
experiments/harness.py: what the experiments stand on. A seed is a whole pipeline in a folder of its
own (the task's data, SFT, the reward model, the candidates); a training job trains one policy there,
keeps --snapshots of it along the way and scores each on the validation prompts; a scoring job scores
a policy on the held-out and out-of-distribution prompts. Jobs run several at once in worker
processes (--jobs), and each reports the seconds it took, so an experiment can say where its time
went. Every job is skipped when its outputs are up to date (machinery/records.py), and scored
samples are kept beside each policy, so an experiment run again redoes only what changed.

The experiments themselves are in experiments/sweep.py (the instrument), ablations.py and values.py.
"""
import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context

import torch

import evaluate
import train
from machinery import processes, records
from machinery.config import STAGES, Config, ConfigError, as_dict, sweep_list
from machinery.files import make_folder, write_json
from machinery.records import file_hash
from machinery.runtime import TrainingError, log, path, setup
from vcb import METHODS

BEFORE_ALIGNMENT = STAGES[:STAGES.index("sample") + 1]  # a seed's pipeline up to its scored candidates


def seed_config(cfg, seed):
    """The options of seed `seed`'s pipeline: the run's own folder for the run's seed, a folder of its
    own under seeds/ for every other (its data, SFT, RM and candidates are its own)."""
    out = cfg.out_dir if seed == cfg.seed else os.path.join(cfg.out_dir, "seeds", f"seed{seed}")
    return dataclasses.replace(cfg, seed=seed, out_dir=out)


def need_gold(cfg, name):
    if cfg.data != "builtin":
        raise ConfigError(f"python -m experiments {name} needs the built-in task's gold reward (--data=builtin)")


# -----------------------------------------------------------------------------
# jobs

@dataclass
class Training:
    """One policy: trained (unless up to date) with snapshots, each scored on the validation prompts."""
    cfg: Config          # its seed's options with its own (beta, learning rate, lam, ...)
    method: str          # a method of vcb.METHODS
    name: str            # its task name in its seed's stages.json
    file: str            # the final policy's checkpoint; the snapshots are file with -step<n>
    steps: list          # the steps at which it is kept (the last one is the final policy)
    candidates: str = ""  # the scored candidates it learns from ("": its seed's own)

    def snapshot(self, step):
        return self.file if step == self.steps[-1] else self.file.removesuffix(".pt") + f"-step{step}.pt"


@dataclass
class Scoring:
    """One policy scored on prompt sets (PROMPT_SETS of evaluate.py)."""
    cfg: Config
    name: str            # the policy's name in the log
    file: str
    sets: tuple = ("eval", "ood")


def prepare(cfg):
    """A seed's pipeline before alignment (its data, SFT, RM and candidates), each stage skipped when
    up to date. Returns the seconds it took."""
    t0, env = time.time(), context_env(cfg)
    if env.master:
        write_config(cfg, "")  # the seed's folder is a run of its own: sample.py and the stages read its config.json
    for stage in BEFORE_ALIGNMENT:
        train.run_stage(cfg, env, stage)
    return {"prepare": time.time() - t0}


def run_training(job):
    """Train (unless up to date) and score every snapshot on the validation prompts. Returns
    ({step: scored validation samples, or None when training failed}, seconds by what took them)."""
    w, times = context(job.cfg), {}
    env, enc = w["env"], w["enc"]
    task = train.align_task(job.cfg, job.method, job.cfg.seed, job.name, job.file, job.candidates or None)
    task.snapshots = {s: job.snapshot(s) for s in job.steps[:-1]}
    task.outputs = task.outputs + list(task.snapshots.values())

    def work():
        file = job.candidates or path(job.cfg, "candidates.jsonl")
        key = (file, file_hash(file))  # experiments may rewrite a candidates file between runs
        if key not in w["cands"]:
            w["cands"][key] = train.candidates(job.cfg, env, enc, file)
        train.align(job.cfg, env, enc, w["cands"][key], job.method, job.cfg.seed, task)
    t0 = time.time()
    try:
        records.run(job.cfg, env, task, work)
    except TrainingError as e:  # a learning rate of the grid that diverges: no candidate, said in the tables
        log(env, f"{job.name}: {e}")
        return None, {f"train {job.method}": time.time() - t0}
    times[f"train {job.method}"] = time.time() - t0
    t0 = time.time()
    scored = {s: evaluate.score_policy(job.cfg, env, enc, job.name, job.snapshot(s), job.cfg.seed, w["refs"], sets=("val",))
              for s in job.steps}
    times["score on validation prompts"] = time.time() - t0
    return scored, times


def run_scoring(job):
    """The scored samples of one policy on its sets, and the seconds they took."""
    w, t0 = context(job.cfg), time.time()
    scored = evaluate.score_policy(job.cfg, w["env"], w["enc"], job.name, job.file, job.cfg.seed, w["refs"], job.sets)
    return scored, {"score on held-out prompts": time.time() - t0}


def run_jobs(cfg, env, fn, jobs):
    """[fn(job) for job in jobs]. With --jobs > 1 (auto on a CPU: one per core) they run in worker
    processes of cores / workers threads each: a small model keeps two threads only partly busy, so
    independent jobs side by side use the cores better; the longest start first (cost), so that no
    worker is left alone with a long one at the end. Under torchrun they run in turn. The workers die
    with this process, whatever kills it (worker_init); a worker that dies is one line, and what it
    finished is kept."""
    workers = min(cfg.jobs or (1 if env.device_type == "cuda" else os.cpu_count() or 1), len(jobs))
    if workers <= 1 or env.world > 1:
        _state["env"] = _state.get("env") or env
        return [fn(job) for job in jobs]
    log(env, f"{len(jobs)} jobs on {workers} worker processes")
    order = longest_first(jobs)
    with worker_pool(workers) as pool:
        try:
            done = dict(zip(order, pool.map(fn, [jobs[i] for i in order])))
            return [done[i] for i in range(len(jobs))]
        except BrokenProcessPool:
            raise TrainingError("a worker process of the experiment died (killed, perhaps by the system for lack of memory): "
                                "the policies it finished are kept; run the same command again to go on") from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the jobs not started yet are dropped, not waited for
            raise


def step_cost(m):
    """About how long a step of method m takes against an offline one, on the CPU: an online iteration
    samples and scores (x4), PPO's trains a critic too (x12). Only the order of the jobs depends on it."""
    return 12 if m.critic else 4 if m.online else 1


def longest_first(jobs):
    """The jobs' indices, the longest first (a training's steps weighted by step_cost; others last),
    jobs of equal length in their own order."""
    cost = lambda job: step_cost(METHODS[job.method]) * job.steps[-1] if isinstance(job, Training) else 0  # noqa: E731
    return sorted(range(len(jobs)), key=lambda i: -cost(jobs[i]))


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


_state = {"contexts": {}}  # per process: its device environment, and per seed folder what every job there reads


def context_env(cfg):
    if "env" not in _state:  # a worker's progress bars would mix with the others'
        _state["env"] = dataclasses.replace(setup(cfg), bars=False)
    return _state["env"]


def context(cfg):
    """What every job of this process reads in cfg's seed folder, loaded at its first job there: the
    tokenizer, the reference models (SFT and the RM) and the candidates files it has read."""
    key = os.path.abspath(cfg.out_dir)
    if key not in _state["contexts"]:
        env = context_env(cfg)
        enc = train.tokenizer(cfg)
        _state["contexts"][key] = dict(env=env, enc=enc, cands={}, refs=evaluate.reference_models(cfg, env, enc))
    return _state["contexts"][key]


def merge_times(total, times):
    for k, v in times.items():
        total[k] = total.get(k, 0.0) + v
    return total


def write_config(cfg, folder):
    make_folder(path(cfg, folder))
    write_json(path(cfg, folder, "config.json"), as_dict(cfg))


def lr_of(cfg, method, factor):
    """The options of a training at `factor` times its learning rate (offline: --align_lr, online:
    --online_lr and PPO's critic --critic_lr)."""
    if METHODS[method].online:
        return dict(online_lr=cfg.online_lr * factor, critic_lr=cfg.critic_lr * factor)
    return dict(align_lr=cfg.align_lr * factor)


def seeds_of(cfg):
    return sweep_list(cfg, "sweep_seeds", int)
