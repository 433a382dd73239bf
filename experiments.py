"""
experiments.py: experiments that drive the pipeline's stages many times.

    python experiments.py sweep     # the pipeline, then every method over sweep_betas x sweep_seeds -> frontier

Every experiment first runs (or finds up to date) the stages of train.py in --out_dir, then writes
its own files into a folder of it. Options are train.py's (python train.py --help).
"""
import dataclasses

import data
import report
import train
from config import ConfigError, method_list, sweep_list
from evaluate import beta_label, evaluate, judge_name
from runtime import command, load_candidates, load_tokenizer, log, path, up_to_date


# -----------------------------------------------------------------------------
# sweep: every method over betas and seeds

def sweep(cfg, env):
    """Align and evaluate every method for each beta in sweep_betas and seed in sweep_seeds, sharing
    the SFT model, the RM and the candidates (the seed changes the alignment batch order and the
    evaluation samples). RRHF has no beta and is trained once per seed."""
    enc = load_tokenizer(cfg)
    betas, seeds = sweep_list(cfg, "sweep_betas", float), sweep_list(cfg, "sweep_seeds", int)
    methods = method_list(cfg)
    cands, cache, rows = None, {}, []
    for seed in seeds:
        runs = [(m, b) for b in betas for m in methods if m != "rrhf"] + ([("rrhf", None)] if "rrhf" in methods else [])
        files = {}
        for method, beta in runs:
            sub = dataclasses.replace(cfg, beta=beta if beta is not None else cfg.beta)
            tag = f"{method}-beta{beta:g}-seed{seed}" if beta is not None else f"{method}-seed{seed}"
            task = train.align_task(sub, method, seed, f"sweep-{tag}", path(cfg, "sweep", f"policy_{tag}.pt"))
            if not up_to_date(cfg, env, task):
                cands = cands or load_candidates(cfg, env, enc)
                train.align(sub, env, enc, cands, method, seed, task)
            files[(method, beta)] = task.outputs[0]
        for beta in betas:
            policies = {"sft": path(cfg, "sft.pt"), **{m: f for (m, b), f in files.items() if b == beta or b is None}}
            res = evaluate(cfg, env, enc, policies, seed, cache)
            for method, r in res.items():
                if method in ("sft", "rrhf"):
                    if beta != betas[0]:
                        continue  # beta-free: counted once per seed, and not compared with DPO at one beta
                    r = {s: {**m, "win_rate_vs_dpo": None} for s, m in r.items()}
                rows.append({"method": method, "beta": None if method in ("sft", "rrhf") else beta, "seed": seed, **r})
    if env.master:
        judge, summary = judge_name(cfg), report.summarise(rows)
        data.write_json(path(cfg, "sweep", "results.json"), {"judge": judge, "betas": betas, "seeds": seeds,
                                                              "runs": rows, "summary": summary})
        table = report.results_table({m: {beta_label(m, b): r for b, r in by_beta.items()}
                                      for m, by_beta in summary.items()}, judge)
        data.write_text(path(cfg, "sweep", "results.md"), table + "\n")
        print(f"\nSweep over beta in {betas}, seeds {seeds} (mean ± std over seeds; win vs DPO at the same beta):\n\n{table}\n")
        reward = report.reward_key(judge)
        points = [dict(method=m, beta=b, kl=r["eval"]["kl"][0], kl_std=r["eval"]["kl"][1], reward=r["eval"][reward][0],
                       reward_std=r["eval"][reward][1]) for m, by_beta in summary.items() for b, r in by_beta.items()]
        report.plot_frontier(points, path(cfg, "sweep", "frontier.png"),
                             f"Reward against KL over beta, mean ± std over {len(seeds)} seeds", judge)
        report.plot_curves(path(cfg, "sweep", "curves.jsonl"), path(cfg, "sweep", "curves.png"))
        log(env, f"sweep: wrote {path(cfg, 'sweep', 'results.json')}, results.md, frontier.png and curves.png")



EXPERIMENTS = {"sweep": sweep}


def main(argv):
    if not argv or argv[0] not in EXPERIMENTS:
        raise ConfigError(f"usage: python experiments.py NAME [--key=value ...], NAME one of {', '.join(EXPERIMENTS)}")
    train.main(argv[1:], then=EXPERIMENTS[argv[0]], doc=__doc__)


if __name__ == "__main__":
    command(main)
