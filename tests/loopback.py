"""The internet, stood in for: a real HTTP server on the loopback address, in a thread, that serves small
stand-ins of the files tools/prepare.py fetches at their sources' paths; and those stand-ins, in the
layout the presets read (a GPT-2 of a test's size with a made-up tokenizer in GPT-2's files, HH-RLHF
and TL;DR records in their published formats).

    with Server(folder) as server:    # server.url is http://127.0.0.1:PORT; server.requests what it was asked
        ...

tests/test_prepare.py, tests/test_plan.py and tests/test_readme.py use it. Nothing leaves 127.0.0.1.
"""
import gzip
import http.server
import json
import os
import re
import shutil
import socket
import threading
from urllib.parse import unquote, urlsplit

import torch

import data
from model import GPT, GPTConfig
from test_real_data import HH
from tools import gpt2, prepare


class Handler(http.server.BaseHTTPRequestHandler):
    """GET of a file below the server's folder, whole or from a byte on (Range: bytes=N-), as the hub
    and OpenAI's storage answer; the connection closes after each answer (HTTP/1.0)."""

    def do_GET(self):
        server, path = self.server, unquote(urlsplit(self.path).path)
        server.requests.append((path, self.headers.get("Range")))
        file = os.path.join(server.root, path.lstrip("/"))
        if not os.path.isfile(file):
            self.send_error(404)
            return
        with open(file, "rb") as f:
            body = f.read()
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "") if server.ranges else None
        start = int(start[1]) if start else None
        if start is not None and start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start is None:
            self.send_response(200)
            start = 0
        else:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if server.lengths:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = server.cut.pop(path, None)  # send this many bytes of the file, once, then close the connection
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])

    def log_message(self, *args):  # quiet: the tests read server.requests instead
        pass


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) serving root, started by `with` and stopped at
    its end. requests: (path, Range header) of every GET; cut: {path: bytes} to send of a file once;
    httpd.ranges = False: Range headers are ignored, as by a server that cannot resume; httpd.lengths =
    False: no Content-Length, the answer ends when the connection closes, as a streaming server's."""

    def __init__(self, root):
        self.root = str(root)

    def __enter__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.root, self.httpd.requests, self.httpd.cut, self.httpd.ranges, self.httpd.lengths = self.root, [], {}, True, True
        self.requests, self.cut = self.httpd.requests, self.httpd.cut
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def free_port():
    """A port of 127.0.0.1 that nothing listens on (a connection to it is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(layout, www, names, sources_file):
    """The files of `names` as they lie in the folder `layout` (in the presets' layout), copied into
    www at the paths of their sources' URLs, and sources_file: the built-in sources of those names with
    these files' sizes and digests wherever the real source publishes a size or a digest (the rest is
    left unknown, as it is for the real files). Returns the sources as written."""
    spec = {}
    for name in names:
        spec[name] = []
        for s in prepare.SOURCES[name]:
            file = os.path.join(www, urlsplit(s.url).path.lstrip("/"))
            os.makedirs(os.path.dirname(file), exist_ok=True)
            shutil.copyfile(os.path.join(layout, s.path), file)
            spec[name].append(dict(path=s.path, url=s.url, size=os.path.getsize(file) if s.size is not None else None,
                                   digest=prepare.digest(file, s.digest) if s.digest else ""))
    with open(sources_file, "w") as f:
        json.dump(spec, f)
    return spec


# ---- stand-ins for the real files, in the layout the presets read ----------------------------------

def write_gpt2(folder, vocab_size=300, positions=1024, seed=0):
    """folder/model.safetensors, config.json, vocab.bpe and encoder.json: a one-layer GPT-2 with 1024
    positions, like GPT-2's, and a BPE made up from the HH stand-in's text in GPT-2's file format."""
    text = "\n".join(c + r for c, r in HH) * 4
    enc = data.train_bpe(text, vocab_size)
    data.write_gpt2_files(enc, folder)
    torch.manual_seed(seed)
    gpt2.save_pretrained(GPT(GPTConfig(block_size=positions, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=32)), folder)
    return enc


def write_gz(file, records):
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with gzip.open(file, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def write_layout(folder, names):
    """Stand-ins of the files of prepare's names gpt2, hh and tldr in folder, each where prepare.py puts
    the real one."""
    for name in names:
        if name == "gpt2":
            write_gpt2(os.path.join(folder, "gpt2"))
        elif name == "hh":
            pairs = [{"chosen": c, "rejected": r} for c, r in HH]
            write_gz(os.path.join(folder, "hh-rlhf", "helpful-base", "train.jsonl.gz"), pairs * 20)
            write_gz(os.path.join(folder, "hh-rlhf", "helpful-base", "test.jsonl.gz"), pairs)
        else:
            write_tldr(os.path.join(folder, "tldr"))


def write_tldr(folder):
    """The filtered posts and one batch file of comparisons per batch prepare.py fetches, as published."""
    posts = [dict(id=f"t3_{i}", subreddit="cooking", title=f"Soup question {i}", post=f"My soup number {i} is too salty.",
                  summary=f"soup {i} too salty") for i in range(12)]
    os.makedirs(os.path.join(folder, "comparisons"), exist_ok=True)
    for split, part in (("train", posts), ("test", posts[:3])):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            f.write("".join(json.dumps(p) + "\n" for p in part))
    for s in prepare.SOURCES["tldr"]:
        if "/comparisons/" in s.path:
            with open(os.path.join(folder, "comparisons", os.path.basename(s.path)), "w") as f:
                f.write("".join(json.dumps({"info": {k: p[k] for k in ("id", "post", "title", "subreddit")},
                                            "summaries": [{"text": " add potato"}, {"text": " soup"}], "choice": i % 2,
                                            "split": "train"}) + "\n" for i, p in enumerate(posts)))
