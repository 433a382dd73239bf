"""
experiments/ablations.py: when do reward values matter? Each ablation varies one thing and reads it on
the sweep's instrument (experiments/sweep.py): the same seeds, grids, snapshots and KL budgets, each
variant's policies chosen on the validation prompts, and two paired differences with their 95%
intervals: from DPO of the same variant, and from the same method in the sweep's variant. The
sweep's own policies are reused, not trained again.

    python -m experiments reward_source   # candidates scored by the reward model, or by the gold reward itself
    python -m experiments rm_quality      # a weaker and a stronger reward model rescoring the same candidates
    python -m experiments n_candidates    # 2, 4, 8 or 16 candidates per prompt
    python -m experiments lam             # VCB's LogSumExp temperature over a prompt's pairs
    python -m experiments sigma           # VCB's sigma(x) per prompt, or one for the whole candidate set
    python -m experiments steps           # VCB and DPO trained steps_factor times longer
"""
import data
import evaluate
import train
from experiments import report
from experiments.harness import need_gold
from experiments.sweep import Arm, run
from machinery import records
from machinery.files import read_jsonl, write_jsonl, write_text
from machinery.progress import finish_task
from machinery.records import Task
from machinery.runtime import load_model, path
from tasks import reviews

OFFLINE = ["vcb", "dpo", "ipo", "slic"]  # the methods that learn from scored candidates and have a beta


def sweep_arms(methods, variant):
    """The sweep's arms of these methods, labelled as an ablation's baseline variant: their policies
    are the sweep's, reused."""
    return [Arm(m, variant, tag="") for m in methods]


# -----------------------------------------------------------------------------
# 1. reward source

def reward_source(cfg, env):
    """Candidates scored by the reward model (the sweep's) against the same candidates scored by the
    gold reward itself, an oracle reward model: what each method gains from exact reward values."""
    need_gold(cfg, "reward_source")
    methods = OFFLINE + ["rrhf"]
    arms = sweep_arms(methods, "RM") + [Arm(m, "gold", candidates=gold_candidates(env), folder="ablations/reward_source")
                                        for m in methods]
    run(cfg, env, "ablations/reward_source", arms, "Candidates scored by the RM or by the gold reward", compare_to="RM")


def gold_candidates(env, folder="ablations/reward_source"):
    """seed options -> that seed's candidates scored by the gold reward itself (an oracle reward
    model), written into its folder."""
    def make(scfg):
        gold = path(scfg, folder, "candidates_gold.jsonl")
        if env.master:
            recs = read_jsonl(path(scfg, "candidates.jsonl"))
            write_jsonl(gold, [{**r, "rewards": evaluate.gold_reward(scfg, r["responses"], [r["prompt"]] * len(r["responses"]))}
                               for r in recs])
        return gold
    return make


# -----------------------------------------------------------------------------
# 2. reward-model quality

RM_VARIANTS = {  # label -> the preference data of its reward model (the default: 3000 pairs at pref_tau 0.25)
    "weak": dict(n_prefs=500, pref_tau=1.0),     # fewer pairs, noisier labels
    "strong": dict(n_prefs=3000, pref_tau=0.05),  # nearly noiseless labels
}


def rm_quality(cfg, env):
    """A weaker and a stronger reward model than each seed's, each rescoring that seed's candidates;
    every RM's accuracy against the gold order and its correlation with the gold reward on the seed's
    held-out preference pairs, beside each method's reward at each KL budget."""
    need_gold(cfg, "rm_quality")
    quality = {}
    arms = sweep_arms(OFFLINE, "default RM")
    for label, prefs in RM_VARIANTS.items():
        arms += [Arm(m, f"{label} RM", candidates=rescored(env, label, prefs, quality), folder="ablations/rm_quality")
                 for m in OFFLINE]
    # the tables come first (they train the reward models); the reward models' quality beside them
    run(cfg, env, "ablations/rm_quality", arms, "Reward models of three qualities", compare_to="default RM")
    if env.master and quality:
        lines = ["| reward model | preference data | accuracy against the gold order [95% CI] | correlation with the gold reward [95% CI] |",
                 "|---|---|---|---|"]
        for k, by_seed in quality.items():
            prefs = RM_VARIANTS.get(k, dict(n_prefs=cfg.n_prefs, pref_tau=cfg.pref_tau))
            lines.append(f"| {k} | {prefs['n_prefs']} pairs, pref_tau {prefs['pref_tau']:g} | "
                         f"{report.ci(report.interval([q['gold_accuracy'] for q in by_seed.values()]))} | "
                         f"{report.ci(report.interval([q['gold_correlation'] for q in by_seed.values()]))} |")
        write_text(path(cfg, "ablations/rm_quality", "reward_models.md"), "\n".join(lines) + "\n")


def rescored(env, label, prefs, quality=None, folder="ablations/rm_quality", judge=None):
    """seed options -> that seed's candidates rescored by a reward model of its own, trained from the
    seed's SFT on other preference data (judge: a monotone function of the gold reward the labels are
    drawn from; made the first time). With quality {}, each seed's RMs judged on its held-out pairs go there."""
    def make(scfg):
        rm_file, cands = path(scfg, folder, f"rm_{label}.pt"), path(scfg, folder, f"candidates_{label}.jsonl")
        enc = train.tokenizer(scfg)
        inputs = [path(scfg, "sft.pt"), path(scfg, "tokenizer.json"), path(scfg, "candidates.jsonl")]
        task = Task(f"rm-{label}", "rm", inputs, [rm_file, cands], extra={"variant": label, **prefs})

        def work():
            pairs = reviews.builtin_task(scfg.seed + 1, n_sft=0, n_align=0, n_eval=0, n_ood=0, judge=judge, **prefs)["prefs"]
            model, _ = train.train_rm(scfg, env, enc, pairs, task)
            finish_task(scfg, env, task, model, enc)
            rescore(scfg, env, model.eval(), cands)
        records.run(scfg, env, task, work)
        if quality is not None:
            _, held = train.split_holdout(scfg, read_jsonl(path(scfg, "data", "prefs.jsonl")))  # the seed's RM's held-out pairs
            quality.setdefault("default", {})[scfg.seed] = rm_scores_on(scfg, env, enc, path(scfg, "rm.pt"), held)
            quality.setdefault(label, {})[scfg.seed] = rm_scores_on(scfg, env, enc, rm_file, held)
        return cands
    return make


def rescore(cfg, env, rm, file):
    """The seed's candidates with their rewards from another reward model, written to file."""
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


# -----------------------------------------------------------------------------
# 3. candidates per prompt

def n_candidates(cfg, env):
    """n = 2, 4, 8, 16 candidates per prompt: the first 2 and 4 of each seed's 8, its 8 (the sweep), and
    16: those 8 and 8 more sampled from its SFT with another seed. With n = 2 VCB sees one pair, like DPO."""
    arms = sweep_arms(["vcb", "dpo"], f"n={cfg.n_candidates}")
    for n in (2, 4, 2 * cfg.n_candidates):
        arms += [Arm(m, f"n={n}", candidates=subset(env, n), folder="ablations/n_candidates") for m in ("vcb", "dpo")]
    run(cfg, env, "ablations/n_candidates", arms, "Candidates per prompt", compare_to=f"n={cfg.n_candidates}")


def subset(env, n):
    """seed options -> the first n of the seed's candidates per prompt, or beyond its own, more sampled
    from its SFT with another seed (a sampling task of its own)."""
    def make(scfg):
        folder, main = "ablations/n_candidates", path(scfg, "candidates.jsonl")
        extra, file = path(scfg, folder, "candidates_more.jsonl"), path(scfg, folder, f"candidates_{n}.jsonl")
        base = read_jsonl(main)
        if n > scfg.n_candidates:
            def work():
                prompts = [r["prompt"] for r in base]
                sampled = evaluate.sample_candidates(scfg, env, train.tokenizer(scfg), prompts, scfg.n_candidates, scfg.seed + 1)
                if env.master:
                    write_jsonl(extra, sampled)
            records.run(scfg, env, Task("more-candidates", "sample", [main], [extra], extra={"seed_offset": 1}), work)
        more = read_jsonl(extra) if n > scfg.n_candidates else base
        if env.master:
            pick = (lambda a, b: (a + b)[:n]) if n > scfg.n_candidates else (lambda a, b: a[:n])
            write_jsonl(file, [{k: pick(r[k], m[k]) if k != "prompt" else r[k] for k in r} for r, m in zip(base, more)])
        return file
    return make


# -----------------------------------------------------------------------------
# 4-6. VCB's lambda and sigma, and training longer

def lam(cfg, env):
    """VCB's LogSumExp temperature over a prompt's pairs: 0 (the mean), 0.1 (the default, the sweep),
    1 and 10 (towards the worst pair); DPO from the sweep."""
    base = f"lam={cfg.lam:g}"
    arms = sweep_arms(["vcb", "dpo"], base)
    arms += [Arm("vcb", f"lam={v:g}", options={"lam": v}, folder="ablations/lam") for v in (0.0, 1.0, 10.0) if v != cfg.lam]
    run(cfg, env, "ablations/lam", arms, "VCB's lambda", compare_to=base)


def sigma(cfg, env):
    """VCB's sigma(x) per prompt (the paper's normalisation) against one sigma for the whole candidate
    set: the reward/KL optimum has one beta for every prompt, and a per-prompt sigma spends KL unevenly."""
    arms = sweep_arms(["vcb", "dpo"], "per prompt") + [Arm("vcb", "global", options={"vcb_sigma": "global"},
                                                            folder="ablations/sigma")]
    run(cfg, env, "ablations/sigma", arms, "VCB's sigma(x): per prompt or global", compare_to="per prompt")


def steps(cfg, env):
    """VCB and DPO trained steps_factor times the usual steps (the learning rate decays over the longer
    run), their stopping points chosen on the validation prompts as in the sweep: does VCB, given the
    steps to reach its targets, move past the order-based methods?"""
    factor = cfg.steps_factor
    arms = sweep_arms(["vcb", "dpo"], "1x") + [Arm(m, f"{factor}x", options={"align_steps": cfg.align_steps * factor},
                                                   folder="ablations/steps") for m in ("vcb", "dpo")]
    run(cfg, env, "ablations/steps", arms, f"Training {factor} times longer", compare_to="1x")


ABLATIONS = {"reward_source": reward_source, "rm_quality": rm_quality, "n_candidates": n_candidates, "lam": lam,
             "sigma": sigma, "steps": steps}
NEEDS_GOLD = {"reward_source", "rm_quality"}
