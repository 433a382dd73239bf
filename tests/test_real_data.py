"""Anthropic HH-RLHF and Reddit TL;DR from local files in their published formats (written here, a
few records each), through the same stages as the built-in task."""
import gzip
import json

import pytest

from conftest import run_train
from tasks import corpora


HH = [  # (chosen, rejected) transcripts, as in hh-rlhf's train.jsonl.gz
    ("\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for eight minutes.",
     "\n\nHuman: How do I boil an egg?\n\nAssistant: Eggs are food."),
    ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: Blue.",
     "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant: I will not."),
    ("\n\nHuman: What is 2+2?\n\nAssistant: 4.", "\n\nHuman: What is 2+2?\n\nAssistant: 5, I think."),
]


def write_hh(folder, extra=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"chosen": c, "rejected": r}) for c, r in HH * 20] + list(extra)
    with gzip.open(folder / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (folder / "test.jsonl").write_text("\n".join(json.dumps({"chosen": c, "rejected": r}) for c, r in HH) + "\n")


def test_hh_prompt_is_everything_up_to_the_last_assistant_turn(tmp_path):
    bad_lines = ['{"chosen": "no turns here", "rejected": "x"}',
                 json.dumps({"chosen": HH[0][0], "rejected": "\n\nHuman: other\n\nAssistant: no"}),
                 "{broken"]
    write_hh(tmp_path / "hh", bad_lines)
    task, notes = corpora.load_task("hh", str(tmp_path / "hh"), {"sft": 0, "prefs": 0}, seed=0)
    pref = task["prefs"][1]
    assert pref == {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.\n\nAssistant:",
                    "chosen": " Blue.", "rejected": " I will not."}
    assert task["sft"][0] == {"prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:",
                              "response": " Put it in boiling water for eight minutes."}
    assert len(task["prefs"]) == 60 and len(task["align_prompts"]) == 3 and len(task["eval_prompts"]) == 3
    assert len(notes) == 1 and "skipped 3 malformed records" in notes[0]
    assert "train.jsonl.gz:61: field 'chosen' has no '\\n\\nAssistant:' turn" in notes[0]
    assert "train.jsonl.gz:62: field 'rejected' does not continue the prompt of 'chosen'" in notes[0]


def test_a_record_with_a_lone_surrogate_is_skipped_and_named(tmp_path):
    write_hh(tmp_path / "hh", ['{"chosen": "\\n\\nHuman: Hi \\ud800\\n\\nAssistant: Yes.", "rejected": "x"}'])
    task, notes = corpora.load_task("hh", str(tmp_path / "hh"), {"sft": 0, "prefs": 0}, seed=0)
    assert len(task["prefs"]) == 60 and "skipped 1 malformed records" in notes[0]
    assert "train.jsonl.gz:61: field 'chosen' is not valid Unicode text" in notes[0]


def write_tldr(folder):
    posts = [dict(subreddit="cooking", title=f"Soup question {i}", post=f"My soup number {i} is too salty. What do I do?",
                  summary=f"soup {i} too salty, help") for i in range(12)]
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps({"id": f"t3_{i}", **p}) + "\n" for i, p in enumerate(posts)))
    (folder / "test.jsonl").write_text(json.dumps({"id": "t3_x", **posts[0], "title": "Held out"}) + "\n")
    (folder / "comparisons").mkdir()
    comps = [{"info": {"id": f"t3_{i}", "post": p["post"], "title": p["title"], "subreddit": p["subreddit"]},
              "summaries": [{"text": " add potato", "policy": "a", "note": None},
                            {"text": "soup", "policy": "b", "note": None}],
              "choice": i % 2, "worker": "w", "batch": "batch1", "split": "train"} for i, p in enumerate(posts)]
    comps.append({"info": {"id": "cnn", "article": "News.", "title": "t"}, "summaries": [], "choice": 0, "split": "valid2"})
    (folder / "comparisons" / "batch1.json").write_text("".join(json.dumps(c) + "\n" for c in comps))
    (folder / "ood_prompts.jsonl").write_text(json.dumps({"prompt": "ARTICLE: A storm hit the coast.\nTL;DR:"}) + "\n")


def test_tldr_posts_and_human_comparisons(tmp_path):
    write_tldr(tmp_path / "tldr")
    task, notes = corpora.load_task("tldr", str(tmp_path / "tldr"), {}, seed=0)
    assert task["sft"][0] == {"prompt": "SUBREDDIT: r/cooking\nTITLE: Soup question 0\nPOST: My soup number 0 is too "
                                        "salty. What do I do?\nTL;DR:", "response": " soup 0 too salty, help"}
    assert task["prefs"][0]["chosen"] == " add potato" and task["prefs"][1]["chosen"] == " soup"  # choice 0, then 1
    assert len(task["prefs"]) == 12 and task["ood_prompts"] == [{"prompt": "ARTICLE: A storm hit the coast.\nTL;DR:"}]
    assert "skipped 1 malformed records" in notes[0] and "batch1.json:13" in notes[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hh", "tldr"])
def test_real_data_runs_through_every_stage(tmp_path, kind):
    folder = tmp_path / kind
    write_hh(folder) if kind == "hh" else write_tldr(folder)
    proc = run_train(tmp_path / "out", f"--data={kind}", f"--data_dir={folder}", "--n_sft=0", "--n_prefs=0",
                     "--methods=vcb,dpo", "--block_size=128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["judge"] == "rm"  # no gold reward on real data: win rates use the reward model
    assert results["methods"]["vcb"]["eval"]["gold_reward"] is None
    assert 0 <= results["methods"]["vcb"]["eval"]["win_rate_vs_dpo"] <= 1
    assert ("ood" in results["methods"]["vcb"]) == (kind == "tldr")
