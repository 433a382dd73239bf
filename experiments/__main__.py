"""
python -m experiments NAME: experiments that drive the pipeline's stages many times.

    python -m experiments sweep     # every method over sweep_betas x sweep_seeds -> the reward/KL frontier
    python -m experiments all       # the sweep, then every ablation
    python -m experiments values    # the value-aware losses against DPO and SLiC

Every experiment first runs (or finds up to date) the stages of train.py in --out_dir, then trains
and evaluates its policies as jobs, several at once in worker processes (--jobs), and writes
results.json, results.md, frontier.png, curves.png and the matched-KL summary into a folder of
its own. Options are train.py's (python train.py --help).
"""
import train
from experiments import ablations, values
from experiments.harness import main_grid, need_gold, write_results
from machinery.config import ConfigError, method_list, sweep_list
from machinery.runtime import command


def sweep(cfg, env):
    """Align and evaluate every method for each beta in sweep_betas (the online ones: sweep_online_betas)
    and seed in sweep_seeds, sharing the SFT model, the RM and the candidates (the seed changes the
    alignment batch order and the evaluation samples). A method without a beta is trained once per seed."""
    seeds = sweep_list(cfg, "sweep_seeds", int)
    write_results(cfg, env, "sweep", main_grid(cfg, env, method_list(cfg)),
                  f"Reward against KL over beta, mean ± std over {len(seeds)} seeds", "Sweep")


EXPERIMENTS = {"sweep": sweep, "reward_source": ablations.reward_source, "rm_quality": ablations.rm_quality,
               "n_candidates": ablations.n_candidates, "lam": ablations.lam, "steps": ablations.steps,
               "sigma": ablations.sigma, "ood": ablations.ood, "values": values.values}
NEEDS_GOLD = {"reward_source", "rm_quality", "values", "all"}  # they judge with the built-in task's gold reward


def every(cfg, env):
    """The sweep, then every ablation."""
    for name, run in list(EXPERIMENTS.items()):
        if name != "all":
            run(cfg, env)


EXPERIMENTS["all"] = every


def main(argv):
    if not argv or argv[0] not in EXPERIMENTS:
        raise ConfigError(f"usage: python -m experiments NAME [--key=value ...], NAME one of {', '.join(EXPERIMENTS)}")
    name = argv[0]
    check = (lambda cfg: need_gold(cfg, name)) if name in NEEDS_GOLD else None  # before the first stage, not after it
    train.main(argv[1:], then=EXPERIMENTS[name], doc=__doc__, check=check)


if __name__ == "__main__":
    command(main)
