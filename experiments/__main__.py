"""
python -m experiments NAME: experiments that drive the pipeline many times, all on one instrument
(experiments/sweep.py): several seeds, each a whole pipeline; each method over its grid of betas and
learning rates, with snapshots along training; each method's policy at a KL budget chosen on the
validation prompts and scored on the held-out ones; paired differences with their 95% intervals.

    python -m experiments sweep            # every method of --methods over its grid -> out/sweep/
    python -m experiments sweep --quick    # two seeds, a few minutes
    python -m experiments all              # the sweep, then every ablation -> out/ablations/
    python -m experiments values           # the value-aware losses against DPO and SLiC
    python -m experiments values_vs_ranks  # the same loss told the true values or only their ranks

Every experiment first runs (or finds up to date) the stages of train.py in --out_dir (the default
run, the seed of --seed) and each other seed's pipeline before alignment (in --out_dir/seeds/), then
trains and scores its policies as jobs, several at once in worker processes (--jobs), and writes its
tables, figures and where its time went into a folder of its own. Options are train.py's
(python train.py --help).
"""
import train
from experiments import ablations, values
from experiments.harness import need_gold
from experiments.sweep import sweep
from machinery.config import ConfigError
from machinery.runtime import command

EXPERIMENTS = {"sweep": sweep, **ablations.ABLATIONS, "values": values.values, "values_vs_ranks": values.values_vs_ranks}
NEEDS_GOLD = {"values", "values_vs_ranks", "all", *ablations.NEEDS_GOLD}  # they judge with the built-in task's gold reward


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
