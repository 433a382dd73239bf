"""python train.py --preset=... --plan: each preset checked against stand-ins of its files in the layout
tools/prepare.py writes (tests/loopback.py), and what it refuses, each in one line, with nothing written."""
import os

import pytest

import train
from conftest import ROOT
from loopback import write_layout
from machinery.config import ConfigError
from machinery.files import DataError


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """What python -m tools.prepare gpt2 hh tldr writes, at a test's size."""
    folder = tmp_path_factory.mktemp("layout")
    write_layout(folder, ["gpt2", "hh", "tldr"])
    return folder


def plan(folder, monkeypatch, *args, preset="gpt2-hh"):
    """train.py --plan as a user runs it, from the folder that holds the files (the presets' paths are
    relative to it); returns what it printed, after checking that it wrote nothing."""
    monkeypatch.chdir(folder)
    before = sorted(p for p in folder.rglob("*"))
    train.main([f"--preset={os.path.join(ROOT, 'presets', preset + '.json')}", "--device=cpu", *args, "--plan"])
    assert sorted(p for p in folder.rglob("*")) == before


@pytest.mark.parametrize("preset,data", [("gpt2-hh", "hh in hh-rlhf/helpful-base: train.jsonl.gz, test.jsonl.gz"),
                                         ("gpt2-tldr", "tldr in tldr: train.jsonl, test.jsonl, comparisons/batch10.json")])
def test_each_preset_is_checked_and_its_stages_estimated(layout, monkeypatch, capsys, preset, data):
    plan(layout, monkeypatch, preset=preset)
    out = capsys.readouterr().out
    for text in (f"plan of --preset={ROOT}/presets/{preset}.json: 1 process, device cpu", f"data: {data}",
                 "tokenizer: GPT-2's, from gpt2/vocab.bpe and encoder.json: 300 tokens",
                 "weights: gpt2/model.safetensors: 1 layers x 32, 2 heads, 1024 positions (cropped to",
                 "every key and shape fits", "methods: vcb, dpo, ipo, slic, rrhf on the scored candidates; ppo, rloo online",
                 f"stages: data, sft, rm, sample, align, eval, into out-{preset.split('-')[1]}/",
                 "estimated (not measured) for", "| sft |", "| align: vcb, dpo, ipo, slic, rrhf |", "| align: ppo |",
                 "| eval |", "| all |", "plan: everything this run reads is here and readable"):
        assert text in out, text


@pytest.mark.parametrize("remove,message", [
    ("hh-rlhf/helpful-base/test.jsonl.gz", "hh-rlhf/helpful-base: none of test.jsonl.gz, test.jsonl found"),
    ("gpt2/encoder.json", "--tokenizer=gpt2: gpt2/vocab.bpe and encoder.json are missing"),
    ("gpt2/model.safetensors", "--init_from=gpt2/model.safetensors: no such file (python -m tools.prepare gpt2"),
])
def test_a_missing_file_is_named_in_one_line(layout, tmp_path, monkeypatch, remove, message):
    import shutil
    shutil.copytree(layout, tmp_path / "files")
    os.remove(tmp_path / "files" / remove)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-cache"))
    with pytest.raises(DataError) as e:
        plan(tmp_path / "files", monkeypatch)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_records_and_weights_that_do_not_fit_are_refused(layout, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(layout, tmp_path / "files")
    (tmp_path / "files" / "tldr" / "test.jsonl").write_text('{"post": "no title"}\n')
    with pytest.raises(DataError, match=r"test.jsonl: no usable record \(first problem: .*missing field 'subreddit'"):
        plan(tmp_path / "files", monkeypatch, preset="gpt2-tldr")
    with pytest.raises(DataError, match="has 1024 positions, fewer than --block_size=2048"):
        plan(tmp_path / "files", monkeypatch, "--block_size=2048")
    (tmp_path / "files" / "gpt2" / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="gpt2/model.safetensors: not a readable safetensors file"):
        plan(tmp_path / "files", monkeypatch)


def test_the_methods_allowed_depend_on_the_launcher(layout, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it
    with pytest.raises(ConfigError, match="--methods has ppo, rloo, which run in one process: leave them out under torchrun"):
        plan(layout, monkeypatch)
    plan(layout, monkeypatch, "--methods=vcb,dpo,ipo,slic,rrhf")
    out = capsys.readouterr().out
    assert "2 processes" in out and "on each of 2 GPUs" in out and "| align: ppo |" not in out


def test_a_later_stage_needs_the_files_of_the_earlier_ones(layout, monkeypatch):
    with pytest.raises(DataError, match=r"out-hh/candidates.jsonl: missing, and --stage=align reads it"):
        plan(layout, monkeypatch, "--stage=align")
