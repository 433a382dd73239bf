"""tools/prepare.py against a real HTTP server on 127.0.0.1 (tests/loopback.py) serving stand-ins of the
files at their sources' paths: a clean fetch, a rerun that fetches nothing, a connection cut midway that
the next run resumes, a wrong size or checksum refused and removed, a 404, and no server at all."""
import hashlib
import json
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from conftest import ROOT
from loopback import Server, free_port, serve, write_layout
from machinery.config import read_options
from machinery.files import DataError
from tools import prepare


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """Stand-ins of the files of gpt2 and hh, in the presets' layout (made once: the GPT-2 takes a second)."""
    folder = tmp_path_factory.mktemp("layout")
    write_layout(folder, ["gpt2", "hh"])
    return folder


@pytest.fixture
def site(layout, tmp_path):
    """The stand-ins served at their sources' paths; yields (server, sources file, destination folder)."""
    sources = tmp_path / "sources.json"
    serve(layout, tmp_path / "www", ["gpt2", "hh"], sources)
    with Server(tmp_path / "www") as server:
        yield server, sources, tmp_path / "dest"


def fetch(site, *args):
    server, sources, dest = site
    prepare.main([*args, f"--dest={dest}", f"--mirror={server.url}", f"--sources={sources}", "--timeout=10"])


def edit(sources, path, **changes):
    """Change what the sources file says of the file at path (its size, its digest)."""
    spec = json.loads(sources.read_text())
    for items in spec.values():
        for item in items:
            if item["path"] == path:
                item.update(changes)
    sources.write_text(json.dumps(spec))


WEIGHTS = "gpt2/model.safetensors"
WEIGHTS_URL = urlsplit(next(s.url for s in prepare.SOURCES["gpt2"] if s.path == WEIGHTS)).path


def parts(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.part"))


def test_a_clean_fetch_lands_every_file_where_the_presets_read_it(site, layout, capsys):
    server, _, dest = site
    fetch(site, "gpt2", "hh")
    wanted = [s.path for s in prepare.SOURCES["gpt2"] + prepare.SOURCES["hh"]]
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(wanted)
    assert all((dest / p).read_bytes() == (layout / p).read_bytes() for p in wanted) and not parts(dest)
    # each file was asked for once, at its real source's path
    assert sorted(path for path, _ in server.requests) == sorted(urlsplit(s.url).path for s in
                                                                  prepare.SOURCES["gpt2"] + prepare.SOURCES["hh"])
    out = capsys.readouterr().out
    assert f"{WEIGHTS} <- {server.url}{WEIGHTS_URL}" in out and "fetched 6 files" in out and "0 already there" in out


def test_a_rerun_fetches_nothing(site, capsys):
    server = site[0]
    fetch(site, "gpt2", "hh")
    server.requests.clear()
    fetch(site, "hh", "gpt2")
    assert server.requests == []
    out = capsys.readouterr().out
    assert f"{WEIGHTS}: already there" in out and "fetched 0 files (0.0 MB), 6 already there" in out


def test_a_connection_cut_midway_is_resumed_by_the_next_run(site, layout, capsys):
    server, _, dest = site
    size = (layout / WEIGHTS).stat().st_size
    server.cut[WEIGHTS_URL] = size // 3
    with pytest.raises(DataError) as e:
        fetch(site, "gpt2")
    assert "run this again to resume" in str(e.value) and WEIGHTS_URL in str(e.value)
    assert not (dest / WEIGHTS).exists() and (dest / (WEIGHTS + ".part")).stat().st_size == size // 3
    server.requests.clear()
    fetch(site, "gpt2")
    assert (WEIGHTS_URL, f"bytes={size // 3}-") in server.requests  # only the rest was asked for
    assert (dest / WEIGHTS).read_bytes() == (layout / WEIGHTS).read_bytes() and not parts(dest)
    assert "(resuming after" in capsys.readouterr().out


def test_a_server_that_cannot_resume_sends_the_whole_file_again(site, layout, capsys):
    server, _, dest = site
    server.cut[WEIGHTS_URL] = 5000
    with pytest.raises(DataError, match="run this again to resume"):
        fetch(site, "gpt2")
    server.httpd.ranges = False  # it answers a Range request with the whole file (200)
    fetch(site, "gpt2")
    assert (dest / WEIGHTS).read_bytes() == (layout / WEIGHTS).read_bytes() and not parts(dest)
    assert "(resuming after" not in capsys.readouterr().out


def test_a_file_of_the_wrong_size_is_refused_and_removed(site, layout):
    _, sources, dest = site
    edit(sources, WEIGHTS, size=(layout / WEIGHTS).stat().st_size + 1)
    with pytest.raises(DataError) as e:
        fetch(site, "gpt2")
    assert "refused and removed" in str(e.value) and "published file has" in str(e.value)
    assert "the server has" in str(e.value)  # refused on the size the server announced, before the transfer
    assert not (dest / WEIGHTS).exists() and not parts(dest)


def test_a_file_of_the_wrong_size_is_refused_when_the_server_announces_no_size(site, layout):
    """A server that streams without Content-Length: the published size is checked on what arrived."""
    server, sources, dest = site
    edit(sources, WEIGHTS, size=(layout / WEIGHTS).stat().st_size + 1, digest="")  # no checksum to catch it instead
    server.httpd.lengths = False
    with pytest.raises(DataError) as e:
        fetch(site, "gpt2")
    assert "refused and removed" in str(e.value) and "published file has" in str(e.value)
    assert not (dest / WEIGHTS).exists() and not parts(dest)

def test_a_file_whose_size_is_not_published_is_held_to_what_the_server_announced(site, layout):
    """A transfer that ends early with no published size to compare with is still caught (Content-Length)."""
    server, sources, dest = site
    edit(sources, WEIGHTS, size=None, digest="")
    server.cut[WEIGHTS_URL] = 1000
    with pytest.raises(DataError, match="closed after 1,000 of"):
        fetch(site, "gpt2")
    assert not (dest / WEIGHTS).exists()


@pytest.mark.parametrize("path", [WEIGHTS, "gpt2/config.json"])  # a sha256, a git blob id
def test_a_file_with_the_wrong_checksum_is_refused_and_removed(site, path):
    _, sources, dest = site
    spec = json.loads(sources.read_text())
    digest = next(i["digest"] for items in spec.values() for i in items if i["path"] == path)
    edit(sources, path, digest=digest[:-1] + ("0" if digest[-1] != "0" else "1"))
    with pytest.raises(DataError) as e:
        fetch(site, "gpt2")
    assert f"its checksum is {digest}, not the published" in str(e.value) and "refused and removed" in str(e.value)
    assert not (dest / path).exists() and not parts(dest)


def test_a_404_names_the_url_and_what_to_do_in_one_line(site, tmp_path):
    server, sources, dest = site
    missing = urlsplit(prepare.SOURCES["hh"][1].url).path
    os.remove(tmp_path / "www" / missing.lstrip("/"))
    proc = subprocess.run([sys.executable, "-m", "tools.prepare", "hh", f"--dest={dest}", f"--mirror={server.url}",
                           f"--sources={sources}", "--timeout=10"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {server.url}{missing}: HTTP 404, not there") and "by hand into" in line
    assert (dest / prepare.SOURCES["hh"][0].path).exists()  # what came before the 404 stays


def test_no_server_at_all_fails_at_once_naming_the_url(site):
    _, sources, dest = site
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError) as e:
        prepare.main(["gpt2", f"--dest={dest}", f"--mirror={url}", f"--sources={sources}", "--timeout=5"])
    assert str(e.value).startswith(f"cannot reach {url}{WEIGHTS_URL} (") and "needs the network" in str(e.value)
    assert not dest.exists() or not any(dest.rglob("*.*"))


def test_a_file_already_there_of_the_wrong_size_is_left_alone_and_named(site):
    server, _, dest = site
    (dest / "gpt2").mkdir(parents=True)
    (dest / WEIGHTS).write_bytes(b"mine")
    with pytest.raises(DataError, match="4 bytes, but .* has .*: delete it"):
        fetch(site, "gpt2")
    assert (dest / WEIGHTS).read_bytes() == b"mine" and server.requests == []


def test_digests_are_those_git_and_sha256sum_compute(tmp_path):
    file = tmp_path / "f"
    file.write_bytes(b"hello\n")
    assert prepare.digest(file, "sha256:") == "sha256:" + hashlib.sha256(b"hello\n").hexdigest()
    git = subprocess.run(["git", "hash-object", str(file)], capture_output=True, text=True)
    if git.returncode == 0:
        assert prepare.digest(file, "git-sha1:") == "git-sha1:" + git.stdout.strip()


def test_the_sources_fill_the_layout_the_presets_read():
    """Every file a preset reads is among the sources of the names its README command fetches."""
    paths = {s.path for items in prepare.SOURCES.values() for s in items}
    assert len(paths) == sum(len(items) for items in prepare.SOURCES.values())  # no two sources write one file
    for preset, names in (("gpt2-hh", ["gpt2", "hh"]), ("gpt2-tldr", ["gpt2", "tldr"])):
        options = read_options(os.path.join(ROOT, "presets", f"{preset}.json"))
        mine = {s.path for n in names for s in prepare.SOURCES[n]}
        assert {options["init_from"], "gpt2/config.json", "gpt2/vocab.bpe", "gpt2/encoder.json"} <= mine
        assert any(p.startswith(options["data_dir"] + "/train.jsonl") for p in mine)
        assert any(p.startswith(options["data_dir"] + "/test.jsonl") for p in mine)
    for items in prepare.SOURCES.values():
        for s in items:
            assert s.url.startswith("https://") and (s.digest == "" or s.digest.split(":")[0] in ("sha256", "git-sha1"))
