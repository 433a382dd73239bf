"""The README's user paths, as written. From a fresh copy of the repository, with a loopback server
standing in for the internet (tests/loopback.py), the README's commands run one after the other through
bash as a user types them, each with options appended that make it tiny and keep it on the CPU: for GPT-2
on HH the fetch, the plan, every stage of the preset with its own methods, the samples and the export;
for GPT-2 on TL;DR all but the export.
Only the fetch may open a connection, and only to 127.0.0.1: a sitecustomize refuses any other."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY
from loopback import Server, serve, write_layout
from tools import gpt2


pytestmark = pytest.mark.slow

GUARD = '''import os, socket
_connect = socket.socket.connect


def connect(self, address):  # tests/test_readme.py: no command but the fetch opens a connection, and it only to 127.0.0.1
    if self.family in (socket.AF_INET, socket.AF_INET6) and not (os.environ.get("LOOPBACK_OK") and address[0] == "127.0.0.1"):
        raise OSError(f"no network here: a connection to {address} was refused")
    return _connect(self, address)


socket.socket.connect = connect
'''


def readme_commands(name):
    """The lines of the README's code block after '<!-- user path: NAME', their comments cut."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("```bash\n", text.index(f"<!-- user path: {name}")) + len("```bash\n")
    return [line.split("  #")[0].rstrip() for line in text[start:text.index("```", start)].splitlines() if line.strip()]


def fresh_clone(folder):
    """The repository's files as a clone has them: those git tracks (as they are in the working tree,
    with the new ones it does not ignore), nothing built, downloaded or run."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode:
        pytest.skip("not a git checkout")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(folder, name))
    return folder


def tiny(command, server, sources):
    """A README command with what makes it tiny appended, run by this Python."""
    extra = {"python -m tools.prepare": f" --mirror={server.url} --sources={sources} --timeout=30",
             "python train.py": " " + " ".join(a for a in TINY if not a.startswith("--methods=")),  # the preset's methods
             "python sample.py": " --num_samples=1 --max_new_tokens=8 --device=cpu"}
    extra = next((v for k, v in extra.items() if command.startswith(k)), "")
    return sys.executable + command.removeprefix("python") + extra


@pytest.fixture
def internet(tmp_path):
    """(the loopback server, sources file, a fresh clone, env) with stand-ins of gpt2, hh and tldr."""
    write_layout(tmp_path / "layout", ["gpt2", "hh", "tldr"])
    serve(tmp_path / "layout", tmp_path / "www", ["gpt2", "hh", "tldr"], tmp_path / "sources.json")
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "guard"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with Server(tmp_path / "www") as server:
        yield server, tmp_path / "sources.json", fresh_clone(tmp_path / "clone"), env


def run(line, internet):
    server, sources, clone, env = internet
    command = tiny(line, server, sources)
    net = {"LOOPBACK_OK": "1"} if line.startswith("python -m tools.prepare") else {}
    proc = subprocess.run(["bash", "-c", command], cwd=clone, env={**env, **net}, capture_output=True, text=True, timeout=900)
    print(f"$ {line}\n{proc.stdout}")  # what each printed: python -m pytest -rP shows it
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_guard_refuses_the_network(internet):
    server, _, clone, env = internet
    proc = subprocess.run([sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{server.url}/x')"], cwd=clone,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no network here" in proc.stderr


def test_gpt2_on_hh_fetch_plan_every_stage_samples_and_export_as_the_readme_writes_them(internet):
    clone = internet[2]
    lines = readme_commands("gpt2-hh")
    assert lines[0] == "python -m tools.prepare gpt2 hh" and lines[1] == "python train.py --preset=presets/gpt2-hh.json --plan"
    assert lines[2] == "python train.py --preset=presets/gpt2-hh.json" and len(lines) == 5
    fetched = run(lines[0], internet)
    assert "fetched 6 files" in fetched and "0 already there" in fetched
    assert "6 already there" in run(lines[0], internet)  # again: nothing fetched
    planned = run(lines[1], internet)
    assert "plan: everything this run reads is here and readable" in planned and "estimated (not measured)" in planned
    assert not (clone / "out-hh").exists()  # the plan wrote nothing
    trained = run(lines[2], internet)
    for method in ("vcb", "dpo", "ipo", "slic", "rrhf", "ppo", "rloo"):  # the preset's list, every stage of each
        assert (clone / "out-hh" / f"policy_{method}.pt").exists() and f"| {method} |" in trained
    assert (clone / "out-hh" / "results.md").exists() and "tokenizer gpt2 with 300 tokens" in trained
    sampled = run(lines[3], internet)
    assert "prompt: '\\n\\nHuman: How do I boil an egg?\\n\\nAssistant:'" in sampled and "  vcb " in sampled
    exported = run(lines[4], internet)
    assert "wrote out-hh/vcb-gpt2/model.safetensors and config.json" in exported
    back = gpt2.from_pretrained(clone / "out-hh" / "vcb-gpt2" / "model.safetensors")
    assert back.config.vocab_size == 300 and back.config.block_size == 96


def test_gpt2_on_tldr_fetch_plan_every_stage_and_samples_as_the_readme_writes_them(internet):
    clone = internet[2]
    lines = readme_commands("gpt2-tldr")
    assert lines[0] == "python -m tools.prepare gpt2 tldr" and lines[1] == "python train.py --preset=presets/gpt2-tldr.json --plan"
    assert "fetched 25 files" in run(lines[0], internet)
    assert "data: tldr in tldr: train.jsonl, test.jsonl, comparisons/batch10.json" in run(lines[1], internet)
    trained = run(lines[2], internet)
    assert all((clone / "out-tldr" / f"policy_{m}.pt").exists() for m in ("vcb", "dpo", "ipo", "slic", "rrhf", "ppo", "rloo"))
    assert "| rloo |" in trained and "prompt: 'SUBREDDIT: r/cooking" in run(lines[3], internet)
