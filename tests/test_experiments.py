"""The experiments (python -m experiments): the instrument's intervals, budgets and paired differences
on hand-made results, the scored samples every experiment reuses, and every experiment on a tiny run."""
import json
import operator
import shutil

import pytest
import torch

import evaluate
import train
from conftest import TINY, run_experiment
from experiments import harness, report, sweep
from machinery import config, files, runtime


JUDGE = "gold"


def test_the_interval_is_students_t_on_the_sample_standard_deviation():
    d = report.interval([1.0, 2.0, 3.0])  # mean 2, sample std 1, t(2 df) = 4.303
    assert d["mean"] == 2.0 and d["n"] == 3
    assert d["hi"] - 2.0 == pytest.approx(4.303 / 3 ** 0.5) and d["lo"] == pytest.approx(2.0 - 4.303 / 3 ** 0.5)
    assert report.t95(4) == 2.776 and report.t95(60) == pytest.approx(2.000, abs=1e-3) and report.t95(10 ** 6) == pytest.approx(1.96, abs=1e-3)
    assert report.interval([0.5])["lo"] is None and report.interval([])["mean"] is None
    assert report.ci(report.interval([1.0, 2.0, 3.0])) == "2.000 [-0.484, 4.484]"
    assert report.ci(report.interval([0.5]), signed=True) == "+0.500 (one seed)"


def test_the_verdict_is_what_the_interval_of_the_paired_difference_says():
    assert report.verdict(report.interval([0.10, 0.12, 0.11])) == "ahead"
    assert report.verdict(report.interval([-0.10, -0.12, -0.11])) == "behind"
    assert report.verdict(report.interval([0.10, -0.12, 0.01])) == "level"
    assert report.verdict(report.interval([0.3])) == "-"  # one seed: no interval, no verdict


def candidate(seed, kl, reward, final=True, **kw):
    return dict(label=kw.get("label", "vcb"), seed=seed, val_kl=kl, val_reward=reward, final=final, beta=1.0, lr=1.0,
                step=kw.get("step", 60), of=60, file=f"p{seed}-{kl}-{reward}")


def test_a_budget_takes_the_best_validation_reward_within_its_window():
    cands = [candidate(0, 1.0, 0.3), candidate(0, 3.5, 0.6), candidate(0, 3.9, 0.5), candidate(0, 4.2, 0.9), candidate(0, 2.9, 0.8)]
    assert sweep.choose(cands, 4.0)["val_kl"] == 3.5  # in [4 / 1.3, 4]: 3.5 and 3.9; 4.2 is over the budget, 2.9 under the window
    assert sweep.choose(cands, 1.0)["val_kl"] == 1.0 and sweep.choose(cands, 8.0) is None  # nothing in [6.2, 8]
    tied = [candidate(0, 3.2, 0.7), candidate(0, 3.8, 0.7)]
    assert sweep.choose(tied, 4.0)["val_kl"] == 3.2  # a tie goes to the smaller KL


def test_the_difference_from_dpo_is_paired_by_seed_over_the_seeds_where_both_reached():
    grid = sweep.Grid(seeds=[0, 1, 2, 3], lrs=[1.0], kls=[4.0], snapshots=2, quick=False)
    arms = [sweep.Arm("vcb"), sweep.Arm("dpo")]
    rewards = {"vcb": [0.50, 0.60, 0.70, 0.80], "dpo": [0.45, 0.50, None, 0.70]}  # DPO misses seed 2
    chosen = {}
    for name, values in rewards.items():
        for seed, r in enumerate(values):
            c = None if r is None else {**candidate(seed, 3.5, r, label=name), "heldout": {"eval": {"gold_reward": r, "kl": 3.6}}}
            for variant in ("path", "final"):
                chosen[(name, seed, 4.0, variant)] = c
    sft = {s: {"eval": {"gold_reward": 0.1}} for s in grid.seeds}
    rows, sft_row = sweep.summary(arms, chosen, sft, grid, JUDGE, "eval", "path")
    vcb, dpo = rows
    assert vcb["n"] == 4 and vcb["reward"]["mean"] == pytest.approx(0.65) and dpo["n"] == 3
    assert vcb["vs_dpo"]["n"] == 3 and vcb["vs_dpo"]["mean"] == pytest.approx((0.05 + 0.10 + 0.10) / 3)
    assert "vs_dpo" not in dpo and sft_row["reward"]["mean"] == pytest.approx(0.1)
    text = sweep.table(rows, sft_row, JUDGE)
    assert "| vcb | 4 | 4/4 | 3.60 | 0.650 [" in text and "| dpo | 4 | 3/4 |" in text
    assert "] (3 seeds) | ahead |" in text  # the difference is over the 3 seeds both reached, not the row's 4


def test_an_arm_of_the_sweep_in_an_ablation_reuses_the_sweeps_policies(tmp_path):
    cfg = config.parse_args([f"--out_dir={tmp_path}", "--device=cpu"])
    mine, sweeps = sweep.training(cfg, sweep.Arm("vcb", "RM", tag=""), 1.0, 3.0, 6), sweep.training(cfg, sweep.Arm("vcb"), 1.0, 3.0, 6)
    assert (mine.name, mine.file) == (sweeps.name, sweeps.file) and mine.cfg.align_lr == 3 * cfg.align_lr
    other = sweep.training(cfg, sweep.Arm("vcb", "lam=0", options={"lam": 0.0}, folder="ablations/lam"), 1.0, 1.0, 6)
    assert other.name != sweeps.name and other.cfg.lam == 0.0 and "ablations/lam" in other.file
    assert sweeps.steps == [4, 12, 21, 33, 46, 60] and sweeps.snapshot(60) == sweeps.file and sweeps.snapshot(4) != sweeps.file
    online = sweep.training(cfg, sweep.Arm("ppo"), 0.1, 3.0, 6)
    assert online.steps == [2, 6, 11, 16, 23, 30] and online.cfg.online_lr == 3 * cfg.online_lr and online.cfg.beta == 0.1


def test_quick_is_two_seeds_one_beta_per_method_the_usual_learning_rate_and_three_snapshots(tmp_path):
    grid = sweep.grid_of(config.parse_args([f"--out_dir={tmp_path}", "--quick", "--sweep_lrs=0.3,1,3"]))
    assert (grid.seeds, grid.lrs, grid.snapshots) == ([0, 1], [1.0], 3)
    assert grid.betas("dpo") == [3.0] and grid.betas("ppo") == [0.1] and grid.betas("rrhf") == [None]
    assert sweep.grid_of(config.parse_args([f"--out_dir={tmp_path}", "--quick", "--sweep_lrs=0.3,3"])).lrs == [0.3]


def test_the_longest_jobs_start_first_and_the_results_keep_the_jobs_order(tmp_path):
    cfg = config.parse_args([f"--out_dir={tmp_path}", "--device=cpu", "--jobs=2"])
    jobs = [sweep.training(cfg, sweep.Arm(m), beta, 1.0, 2) for m, beta in (("dpo", 1.0), ("ppo", 0.1), ("rloo", 0.1), ("vcb", 1.0))]
    assert harness.longest_first(jobs + ["a scoring"]) == [1, 2, 0, 3, 4]  # ppo, rloo, then the offline ones in order
    env = runtime.Env("cpu", "cpu", torch.float32, 0, 1)
    assert harness.run_jobs(cfg, env, operator.attrgetter("name"), jobs) == [job.name for job in jobs]


def test_a_policy_is_sampled_once_and_again_when_it_changes(tiny_copy, monkeypatch):
    """The eval stage keeps each policy's scored samples beside it; a later evaluation of the same policy
    (the sweep's, an ablation's) reads them back, and a policy that changed is sampled again."""
    cfg = config.parse_args([f"--out_dir={tiny_copy}", *TINY])
    env = runtime.setup(cfg)
    enc = train.tokenizer(cfg)
    refs = evaluate.reference_models(cfg, env, enc)
    sampled, sample_and_score = [], evaluate.sample_and_score
    monkeypatch.setattr(evaluate, "sample_and_score", lambda *a: sampled.append(a[-1]) or sample_and_score(*a))
    file = str(tiny_copy / "policy_vcb.pt")
    kept = evaluate.score_policy(cfg, env, enc, "vcb", file, 0, refs)
    assert sampled == [] and kept == json.loads((tiny_copy / "policy_vcb.seed0.scored.json").read_text())["value"]
    (tiny_copy / "stages.json").unlink()  # with the records, a policy copied over another is refused (test_crash.py)
    shutil.copy(tiny_copy / "policy_dpo.pt", file)  # another policy under the same name
    again = evaluate.score_policy(cfg, env, enc, "vcb", file, 0, refs)
    assert sampled == ["eval", "ood"] and again != kept
    assert evaluate.score_policy(cfg, env, enc, "vcb", file, 1, refs) != again  # another seed: other samples


def test_the_spreads_table_splits_the_prompts_by_their_stake(tmp_path):
    from experiments import values
    from tasks import reviews
    low, high = reviews.LOW_STAKES[0], next(n for n in reviews.MOVIES["names"] if n not in reviews.LOW_STAKES)
    recs = [{"prompt": f"I watched {high}.", "responses": ["a", "b"], "rewards": [0.0, 2.0]},    # sigma 1
            {"prompt": f"I watched {high} again.", "responses": ["a", "b"], "rewards": [0.0, 4.0]},  # sigma 2
            {"prompt": f"I watched {low}.", "responses": ["a", "b"], "rewards": [0.0, 0.2]}]     # sigma 0.1
    files.write_jsonl(tmp_path / "c.jsonl", recs)
    table = values.spreads_table([("set", tmp_path / "c.jsonl")])
    assert table.splitlines()[-1] == "| set | 1.500 ± 0.500 | 0.100 ± 0.000 |"


TINY_GRID = ["--sweep_seeds=0,1", "--sweep_lrs=1", "--snapshots=2", "--sweep_kls=0.05,0.5", "--steps_factor=2"]


@pytest.mark.slow
def test_every_experiment_runs_on_a_tiny_run_and_writes_its_files(tiny_copy):
    proc = run_experiment(tiny_copy, "all", *TINY_GRID, "--methods=vcb,dpo,rrhf,ppo", "--jobs=1", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder in ["sweep"] + [f"ablations/{a}" for a in ("reward_source", "rm_quality", "n_candidates", "lam", "sigma",
                                                             "steps", "values", "values/stakes")]:
        for name in ("results.json", "results.md", "matched_kl.md", "chosen.md", "frontier.png"):
            assert (tiny_copy / folder / name).exists(), (folder, name)
    assert (tiny_copy / "seeds/seed1/candidates.jsonl").exists() and (tiny_copy / "seeds/seed1/config.json").exists()
    sweep_results = json.loads((tiny_copy / "sweep/results.json").read_text())
    assert {"path/eval", "final/eval"} <= sweep_results["tables"].keys()
    assert {c["method"] for c in sweep_results["candidates"]} == {"vcb", "dpo", "rrhf", "ppo"}
    assert {c["seed"] for c in sweep_results["candidates"]} == {0, 1} and {c["step"] for c in sweep_results["candidates"]} >= {2, 3}
    assert "seconds of each kind of work" in (tiny_copy / "sweep/time.md").read_text()
    assert "| reward model |" in (tiny_copy / "ablations/rm_quality/reward_models.md").read_text()
    gold = json.loads((tiny_copy / "ablations/reward_source/results.json").read_text())["tables"]["path/eval"]["rows"]
    assert {r["label"] for r in gold} >= {"vcb (RM)", "vcb (gold)"} and any("vs_base" in r for r in gold)
    lam_files = sorted(p.name for p in (tiny_copy / "ablations/lam").glob("policy_*.pt"))
    assert "policy_vcb-lam_0-beta1-lr1.pt" in lam_files and not list((tiny_copy / "ablations/lam").glob("policy_dpo*"))
    values = {r["label"] for r in json.loads((tiny_copy / "ablations/values/results.json").read_text())["tables"]["path/eval"]["rows"]}
    assert {f"{m} ({v})" for m in ("vcb", "rebel", "infonca", "odpo", "dpo", "slic") for v in ("RM", "gold")} <= values
    assert "| rebel (gold) |" in (tiny_copy / "ablations/values/stakes/levels.md").read_text()
    assert "| the stakes variant, gold |" in (tiny_copy / "ablations/values/spreads.md").read_text()
    stakes = json.loads((tiny_copy / "ablations/values/stakes/run/config.json").read_text())
    assert stakes["stakes"] is True  # the stakes variant has a run of its own


@pytest.mark.slow
def test_the_sweep_runs_in_worker_processes_and_a_second_run_trains_nothing(tiny_copy):
    proc = run_experiment(tiny_copy, "sweep", *TINY_GRID, "--methods=vcb,dpo", "--jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jobs on 2 worker processes" in proc.stdout
    again = run_experiment(tiny_copy, "sweep", *TINY_GRID, "--methods=vcb,dpo", "--jobs=1")
    assert again.returncode == 0 and "step 3/3: loss" not in again.stdout and "sweep-vcb-beta1-lr1: up to date" in again.stdout
    assert (tiny_copy / "sweep/results.md").read_text() in again.stdout
