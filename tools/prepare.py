"""
tools/prepare.py: fetch, once, the files a preset reads: GPT-2's weights and tokenizer, Anthropic
HH-RLHF, Reddit TL;DR. This is the one part of the project that uses the network, and only when run.

    python -m tools.prepare gpt2 hh       # for presets/gpt2-hh.json: gpt2/ and hh-rlhf/helpful-base/
    python -m tools.prepare gpt2 tldr     # for presets/gpt2-tldr.json: gpt2/ and tldr/
    python -m tools.prepare               # every name, what it fetches and how large it is

Each file goes where the presets look for it, below --dest (default: here). A download shows a
progress bar and grows in FILE.part: a connection cut midway leaves the part, and the next run resumes
from it with an HTTP Range request. The file lands (a rename) only once its size, and its checksum
where the source publishes one, are right; a file that fails the check is removed. A file already
there is skipped, so running the command again fetches nothing. With no network, or a file gone from
its source, it stops with one line naming the URL and what to do. Only the standard library's urllib
talks to the network.
"""
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from tqdm import tqdm

from machinery.config import ConfigError, parse_options
from machinery.files import DataError, field, read_json, resumable_path
from machinery.runtime import command


@dataclass
class PrepareConfig:
    dest: str = "."                  # the folder the files go into, in the layout the presets read (gpt2/, hh-rlhf/, tldr/)
    mirror: str = ""                 # fetch every file from this server at its source's path instead (a local copy; the tests' loopback server)
    sources: str = ""                # a JSON file {name: [{path, url, size, digest}]} in place of the list below (the tests' fixture files)
    timeout: float = 60.0            # seconds to wait for the server before giving up (a part file resumes on the next run)


@dataclass
class Source:
    path: str         # where the file goes, below --dest
    url: str          # where it comes from
    size: int = None  # its size in bytes where the source publishes it (else the server's Content-Length is checked)
    digest: str = ""  # "sha256:HEX", or "git-sha1:HEX" (a git blob's id), where the source publishes one


# Where each file comes from, and what its source publishes about it. Only what was checked is written
# down; where a source publishes no size or checksum, the size the server announces is checked and
# nothing else.
# - GPT-2 small from the Hugging Face hub, pinned to the revision whose files these are (main may move):
#   model.safetensors is a Git LFS file whose sha256 and size the hub publishes; config.json is a plain
#   git file, published by its git blob id and size.
# - GPT-2's tokenizer files from OpenAI's public storage, with the sha256 tiktoken 0.14 checks them
#   against (tiktoken_ext/openai_public.py); their sizes are not published.
# - The larger GPT-2s from the hub's main branch, by name: neither size nor checksum is known here.
HUB, BLOB = "https://huggingface.co", "https://openaipublic.blob.core.windows.net"
GPT2_REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
TOKENIZER = [("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
             ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")]


def gpt2(name, revision="main", weights=(None, ""), config=(None, "")):
    hub = f"{HUB}/openai-community/{name}/resolve/{revision}"
    return ([Source(f"{name}/model.safetensors", f"{hub}/model.safetensors", *weights),
             Source(f"{name}/config.json", f"{hub}/config.json", *config)] +
            [Source(f"{name}/{file}", f"{BLOB}/gpt-2/encodings/main/{file}", None, f"sha256:{sha}") for file, sha in TOKENIZER])


# - HH-RLHF from the Anthropic/hh-rlhf data set on the hub. Sizes and sha256 are those of the Git LFS
#   pointers of the same files in github.com/anthropics/hh-rlhf (commit 354e5c3); the hub's copy of
#   helpful-base/train.jsonl.gz is known to have the same sha256. harmless-base/test.jsonl.gz is stored
#   in that repository whole, and its sha256 was computed from it; harmless-base/train.jsonl.gz's is not
#   published there.
HH = {"helpful-base": [(16200131, "518a5bf288456fc9f3b7c980c54116fba0c52f274d3f4d344675d83e4058f6f4"),
                       (875191, "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b")],
      "harmless-base": [(None, ""), (742801, "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03")],
      "helpful-online": [(20127228, "0994d18b82083f5c084ce04071b683958a724df8c7215ab1d851986642d36a2a"),
                         (1053578, "39a475cc7e0df972902f8e3a0972726fce826ac65369bda8c671de4330c60a10")],
      "helpful-rejection-sampled": [(25697148, "0cea2d2ab2187624ec1314e8cc6fb579f0fa987b3a33e8102b7556ed4d255f64"),
                                    (1361231, "abc35dbc56015db1dae0faa484514ccbc3eee0133bfcd557fc69250619b028bb")]}


def hh(subset):
    return [Source(f"hh-rlhf/{subset}/{split}.jsonl.gz", f"{HUB}/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz",
                   size, f"sha256:{sha}" if sha else "") for split, (size, sha) in zip(("train", "test"), HH[subset])]


# - TL;DR as released with "Learning to summarize from human feedback" (github.com/openai/summarize-from-
#   feedback, README): the filtered posts, and the comparison batches of Reddit posts (batch3 to batch22;
#   there is no batch21; the CNN/DM batches are left out: their records have no post). OpenAI's storage
#   publishes no sizes or checksums for them.
TLDR = f"{BLOB}/summarize-from-feedback"
SOURCES = {
    "gpt2": gpt2("gpt2", GPT2_REVISION,
                 weights=(548105171, "sha256:248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
                 config=(665, "git-sha1:10c66461e4c109db5a2196bff4bb59be30396ed8")),
    **{name: gpt2(name) for name in ("gpt2-medium", "gpt2-large", "gpt2-xl")},
    "hh": hh("helpful-base"),
    **{f"hh-{subset}": hh(subset) for subset in ("harmless-base", "helpful-online", "helpful-rejection-sampled")},
    "tldr": [Source(f"tldr/{split}.jsonl", f"{TLDR}/datasets/tldr_3_filtered/{split}.jsonl") for split in ("train", "test")] +
            [Source(f"tldr/comparisons/batch{k}.json", f"{TLDR}/dataset/comparisons/batch{k}.json") for k in [*range(3, 21), 22]],
}
WHAT = {"gpt2": "GPT-2 small (124M) and its tokenizer", "gpt2-medium": "GPT-2 medium (355M) and its tokenizer",
        "gpt2-large": "GPT-2 large (774M) and its tokenizer", "gpt2-xl": "GPT-2 XL (1.5B) and its tokenizer",
        "hh": "HH-RLHF helpful-base", **{f"hh-{s}": f"HH-RLHF {s}" for s in HH},
        "tldr": "Reddit TL;DR posts and human comparisons"}


def read_sources(file):
    """A JSON file of sources, {name: [{path, url, size, digest}, ...]}, each field checked; a path
    must stay below --dest."""
    spec, out = read_json(file), {}
    for name, items in spec.items():
        out[name] = []
        for k, item in enumerate(field(spec, name, list, file)):
            at = f"{name}[{k}]"
            source = Source(field(item, "path", str, f"{file}: {at}"), field(item, "url", str, f"{file}: {at}"))
            if item.get("size") is not None:
                source.size = field(item, "size", int, f"{file}: {at}", lo=0)
            source.digest = field(item, "digest", str, f"{file}: {at}", empty=True) if "digest" in item else ""
            if os.path.isabs(source.path) or ".." in source.path.split("/") or not re.fullmatch(r"(sha256|git-sha1):[0-9a-f]+|", source.digest):
                raise DataError(f"{file}: {at}: a path must be relative and stay inside --dest, a digest sha256:HEX or git-sha1:HEX")
            out[name].append(source)
    return out


# -----------------------------------------------------------------------------
# one file

def fetch(source, opts):
    """Fetch one source into opts.dest unless it is there; returns the bytes fetched (0: it was there)."""
    file = os.path.join(opts.dest, source.path)
    if os.path.exists(file):
        if source.size is not None and os.path.getsize(file) != source.size:
            raise DataError(f"{file}: {os.path.getsize(file):,} bytes, but {source.url} has {source.size:,}: delete it, "
                            f"and run this again to fetch it anew")
        print(f"{source.path}: already there")
        return 0
    url = opts.mirror.rstrip("/") + urlsplit(source.url).path if opts.mirror else source.url
    by_hand = f"or download it by hand into {file}"
    with resumable_path(file) as part:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if source.size is not None and have > source.size:  # no start of this file
            os.remove(part)
            have = 0
        if have and have == source.size:
            print(f"{source.path}: complete in {part}, checking it")
        else:
            download(url, part, have, source, opts, by_hand)
        size = os.path.getsize(part)
        if source.size is not None and size != source.size:
            os.remove(part)
            raise DataError(f"{url}: {size:,} bytes, but the published file has {source.size:,}: refused and removed; run "
                            f"this again to fetch it anew, {by_hand}")
        actual = digest(part, source.digest) if source.digest else ""
        if actual != source.digest:
            os.remove(part)
            raise DataError(f"{url}: its checksum is {actual}, not the published {source.digest}: refused and removed; run "
                            f"this again to fetch it anew (if it fails again, the source has changed), {by_hand}")
    return size


def download(url, part, have, source, opts, by_hand):
    """Append the rest of url to the part file (all of it when the server cannot resume), with a
    progress bar. The bytes the server announces must be the published size where there is one; a
    transfer that stops short leaves the part file for the next run."""
    request = urllib.request.Request(url, headers={"User-Agent": "vcb-prepare", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=opts.timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is no start of this file: begin again next time
            os.remove(part)
            raise DataError(f"{url}: the server cannot resume {part}; it is removed: run this again") from None
        what = "not there (a wrong name, or the file has moved)" if e.code == 404 else f"refused ({e.reason})"
        raise DataError(f"{url}: HTTP {e.code}, {what}: check the address, {by_hand}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot reach {url} ({reason}): this command needs the network (or --mirror=URL of a copy): "
                        f"run it where there is one and copy the files over, {by_hand}") from None
    with response:
        resumed = have and response.status == 206
        if have and not resumed:
            have = 0  # the server sends the whole file: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        if resumed:  # "bytes START-END/TOTAL": the part must be the start of this very file
            span = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not span or int(span[1]) != have:
                os.remove(part)
                raise DataError(f"{url}: the server resumed elsewhere than after the {have:,} bytes of {part}; it is "
                                f"removed: run this again")
            total = int(span[2]) if span[2] != "*" else total
        if source.size is not None and total is not None and total != source.size:
            if os.path.exists(part):
                os.remove(part)
            raise DataError(f"{url}: the server has {total:,} bytes, but the published file has {source.size:,}: refused "
                            f"and removed; check --mirror, {by_hand}")
        print(f"{source.path} <- {url}" + (f" (resuming after {have:,} bytes)" if resumed else ""), flush=True)
        got = have
        try:
            with open(part, "ab" if resumed else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=source.path,
                         mininterval=0.5, file=sys.stderr) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # a reset, a timeout, IncompleteRead
            raise DataError(f"{url}: the transfer stopped after {got:,} of {total or '?'} bytes ({type(e).__name__}: "
                            f"{e}): run this again to resume from {part}") from None
    if total is not None and got < total:
        raise DataError(f"{url}: the connection closed after {got:,} of {total:,} bytes: run this again to resume from {part}")


def digest(file, kind):
    """The digest of a file's content as "sha256:HEX" or "git-sha1:HEX" (git's id of a blob: the sha1 of
    'blob SIZE\\0' and the content), the kind of `kind`."""
    if kind.startswith("git-sha1:"):
        h = hashlib.sha1(b"blob %d\0" % os.path.getsize(file))
    else:
        h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{kind.split(':')[0]}:{h.hexdigest()}"


# -----------------------------------------------------------------------------
# the command

def catalogue(sources):
    """What each name fetches, with the sizes that are known."""
    lines = ["python -m tools.prepare NAME [NAME ...] fetches:"]
    for name, items in sources.items():
        known = sum(s.size for s in items if s.size is not None)
        size = f"{known / 1e6:,.1f} MB" + (" and more" if any(s.size is None for s in items) else "") if known else "size not published"
        folders = ", ".join(dict.fromkeys(os.path.dirname(s.path) + "/" for s in items))
        lines.append(f"  {name:<30} {WHAT.get(name, 'the files of ' + name)} -> {folders} ({len(items)} files, {size})")
    return "\n".join(lines)


def main(argv):
    names = [a for a in argv if not a.startswith("-")]
    opts = parse_options(PrepareConfig(), [a for a in argv if a.startswith("-")], __doc__)
    sources = read_sources(opts.sources) if opts.sources else SOURCES
    if not names:
        print(catalogue(sources))
        return
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise ConfigError(f"unknown name {unknown[0]!r}; known: {', '.join(sources)}")
    todo = list({s.path: s for n in names for s in sources[n]}.values())
    try:
        fetched = [fetch(s, opts) for s in todo]
    except KeyboardInterrupt:  # not runtime.command's message, which speaks of training
        print("\ninterrupted: the files fetched are kept, and the next run resumes the one under way from its .part file",
              file=sys.stderr)
        sys.exit(130)
    print(f"fetched {sum(1 for n in fetched if n)} files ({sum(fetched) / 1e6:,.1f} MB), {fetched.count(0)} already there, "
          f"into {os.path.abspath(opts.dest)}: " + ", ".join(dict.fromkeys(s.path.split("/")[0] + "/" for s in todo)))


if __name__ == "__main__":
    command(main)
