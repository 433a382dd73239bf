"""The experiments (python -m experiments): the matched-KL summary on hand-made curves, the scored samples every experiment
reuses, and every experiment on a tiny run."""
import json
import shutil

import pytest

import evaluate
import train
from conftest import TINY, run_experiment
from experiments import report
from machinery import config, files, runtime


JUDGE = "gold"


def run(method, seed, points):
    """Runs of one method and seed: points [(beta, kl, reward)]."""
    return [{"method": method, "beta": b, "seed": seed, "eval": {"kl": kl, "gold_reward": r}} for b, kl, r in points]


def test_interpolation_inside_at_a_knot_and_outside():
    curve = [(1.0, 0.2), (3.0, 0.6), (5.0, 0.7)]
    assert report.interpolate(curve, 2.0) == pytest.approx(0.4)      # halfway between the first two points
    assert report.interpolate(curve, 3.0) == pytest.approx(0.6)      # at a knot
    assert report.interpolate(curve[::-1], 4.0) == pytest.approx(0.65)  # the order of the points does not matter
    assert report.interpolate(curve, 0.5) is None and report.interpolate(curve, 6.0) is None  # never extrapolated
    assert report.interpolate([(2.0, 0.3)], 2.0) == 0.3 and report.interpolate([], 1.0) is None


def test_matched_kl_reads_each_seed_then_averages_and_marks_what_is_outside():
    runs = (run("vcb", 0, [(1.0, 2.0, 0.5), (0.3, 6.0, 0.9)]) + run("vcb", 1, [(1.0, 1.0, 0.3), (0.3, 5.0, 0.7)])
            + run("dpo", 0, [(1.0, 3.0, 0.6), (0.3, 9.0, 0.8)]) + run("dpo", 1, [(1.0, 3.5, 0.6), (0.3, 10.0, 0.8)]))
    summary = report.matched_kl(runs, JUDGE, kls=(2.0, 4.0, 6.0, 8.0))
    vcb, dpo = summary["vcb"], summary["dpo"]
    # KL 4: seed 0 halfway from 0.5 to 0.9 = 0.7; seed 1 at 3/4 from 0.3 to 0.7 = 0.6
    assert vcb[4.0]["reward"][0] == pytest.approx(0.65) and vcb[4.0]["reward"][1] == pytest.approx(0.05)
    assert vcb[4.0]["seeds"] == 2 and vcb[2.0]["seeds"] == 2 and vcb[2.0]["reward"][0] == pytest.approx((0.5 + 0.4) / 2)
    assert vcb[6.0]["seeds"] == 1 and vcb[6.0]["of"] == 2  # seed 1 stops at KL 5: one seed covers it
    assert vcb[8.0]["reward"] is None and dpo[2.0]["reward"] is None  # outside every seed's range
    table = report.matched_kl_table(summary, JUDGE)
    assert "outside its range" in table and "(1/2 seeds)" in table and "0.650 ± 0.050" in table


def test_win_rates_at_matched_kl_compare_the_nearest_real_policies():
    def rows(values):
        return {"eval": [{"gold": v} for v in values]}
    runs = run("vcb", 0, [(1.0, 2.0, 0.5), (0.3, 4.2, 0.9)]) + run("dpo", 0, [(1.0, 3.9, 0.6), (0.3, 9.0, 0.8)])
    for r, values in zip(runs, ([0.1, 0.1], [0.9, 0.1], [0.5, 0.5], [0.0, 0.0])):
        r["rows"] = rows(values)
    cell = report.matched_kl(runs, JUDGE, kls=(4.0,))["vcb"][4.0]
    assert cell["win"][0] == 0.5 and cell["kl_self"] == 4.2 and cell["kl_baseline"] == 3.9  # 0.9 > 0.5, 0.1 < 0.5


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


@pytest.mark.slow
def test_every_experiment_runs_on_a_tiny_run_and_writes_its_files(tiny_copy):
    grid = ["--sweep_betas=0.5,2", "--sweep_seeds=0,1", "--sweep_online_betas=0.5", "--steps_factor=2", "--jobs=1"]
    proc = run_experiment(tiny_copy, "all", *grid, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder in ["sweep"] + [f"ablations/{a}" for a in ("reward_source", "rm_quality", "n_candidates", "lam", "sigma",
                                                             "steps", "ood", "values", "values/stakes")]:
        for name in ("results.json", "results.md", "steps.png" if folder.endswith("steps") else "frontier.png"):
            assert (tiny_copy / folder / name).exists(), (folder, name)
    quality = json.loads((tiny_copy / "ablations/rm_quality/results.json").read_text())
    assert {"default", "weak", "strong"} == quality["reward_models"].keys()
    assert any(m.endswith("(gold)") for m in json.loads((tiny_copy / "ablations/reward_source/results.json").read_text())["summary"])
    sweep = json.loads((tiny_copy / "sweep/results.json").read_text())
    assert {"eval", "ood"} == sweep["matched_kl"].keys() and "vcb" in sweep["matched_kl"]["eval"]
    lam_files = sorted(p.name for p in (tiny_copy / "ablations/lam").glob("policy_*.pt"))
    assert len(lam_files) == 3 * 2 * 2 and "policy_lam0-vcb-beta0.5-seed0.pt" in lam_files  # no variant overwrites another
    steps = json.loads((tiny_copy / "ablations/steps/results.json").read_text())["runs"]
    assert {(r["method"], r["step"]) for r in steps if r["seed"] == 0} >= {("vcb", s) for s in range(1, 7)}
    assert "Reward at matched KL" in (tiny_copy / "sweep/results.md").read_text()
    values = json.loads((tiny_copy / "ablations/values/results.json").read_text())["summary"]
    assert {f"{m} ({v})" for m in ("vcb", "rebel", "infonca", "odpo", "dpo", "slic") for v in ("RM", "gold")} <= values.keys()
    assert "| rebel (gold) |" in (tiny_copy / "ablations/values/stakes/levels.md").read_text()
    assert "| the stakes variant, gold |" in (tiny_copy / "ablations/values/spreads.md").read_text()
    stakes = json.loads((tiny_copy / "ablations/values/stakes/run/config.json").read_text())
    assert stakes["stakes"] is True  # the stakes variant has a run of its own


@pytest.mark.slow
def test_the_sweep_runs_in_worker_processes(tiny_copy):
    proc = run_experiment(tiny_copy, "sweep", "--methods=vcb,dpo", "--sweep_betas=0.5,2", "--sweep_seeds=0", "--jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jobs on 2 worker processes" in proc.stdout
    runs = json.loads((tiny_copy / "sweep/results.json").read_text())["runs"]
    assert {(r["method"], r["beta"]) for r in runs} == {("sft", None), ("vcb", 0.5), ("vcb", 2.0), ("dpo", 0.5), ("dpo", 2.0)}
