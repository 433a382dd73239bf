"""
tasks/corpora.py: the paper's data sets, Anthropic HH-RLHF and Reddit TL;DR, and your own JSON-lines
files, read from a local folder into the pipeline's records (data.TASK_FILES). Nothing is
downloaded: fetch the published files once and point --data_dir at them (docs/data.md).

- jsonl: our own files, checked strictly: any bad line is an error naming the file, line and field.
- hh, tldr: the published formats, read leniently: a malformed record (a transcript with no
  assistant turn, a broken or non-UTF-8 line, a truncated .gz, a stray file) is skipped, counted
  and reported; a file with no usable record is an error.

The built-in task is in tasks/reviews.py.
"""
import os
import random

from data import SCHEMAS, TASK_FILES

OPTIONAL = ("ood_prompts", "val_prompts")  # files of our own a data folder may hold
from machinery.files import DataError, field, parse_json_line, read_jsonl, text_lines


def load_task(kind, folder, limits, seed=0):
    """The pipeline's records from local files. kind: jsonl (our files, checked strictly: any bad line
    is an error), hh (Anthropic HH-RLHF) or tldr (Reddit TL;DR with human comparisons); malformed
    records of hh and tldr are skipped and reported. limits {name: n} keeps at most n records of
    each file (0: all); prompts are shuffled with the seed first. The validation prompts are the next
    n held-out prompts after the evaluation's (jsonl: val_prompts.jsonl, if there is one). Returns
    (task, notes to log)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder (--data_dir)")
    if kind == "jsonl":
        task = {n: read_jsonl(os.path.join(folder, f"{n}.jsonl"), SCHEMAS[n]) for n in TASK_FILES if n not in OPTIONAL}
        notes = []
    else:
        task, bad = load_hh(folder) if kind == "hh" else load_tldr(folder)
        notes = [f"{kind}: skipped {len(bad)} malformed records, e.g. " + "; ".join(bad[:3])] if bad else []
    for name in OPTIONAL:
        file = os.path.join(folder, f"{name}.jsonl")
        task[name] = read_jsonl(file, SCHEMAS[name]) if os.path.exists(file) else task.get(name, [])
    rng = random.Random(seed)
    for name, n in limits.items():
        if name.endswith("prompts"):
            rng.shuffle(task[name])
        if name == "eval_prompts" and not task["val_prompts"]:  # the held-out prompts the evaluation leaves
            task["val_prompts"] = task[name][n:2 * n] if n else []
        if n:
            task[name] = task[name][:n]
    return task, notes


def first_file(folder, names):
    """The first of names that is a regular file in folder (a folder of that name does not count)."""
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    others = [n for n in names if os.path.exists(os.path.join(folder, n))]
    raise DataError(f"{folder}: none of {', '.join(names)} found" + (f" ({others[0]} is not a regular file)" if others else ""))


def json_lines(file, bad):
    """(line number, record) of each readable line of a JSON-lines file, leniently: the reason for
    each unreadable line goes to `bad` as 'file:line: why' and the line is skipped; a file cut short
    (a truncated download) gives the records before the cut and one entry in `bad`."""
    try:
        for n, line in text_lines(file):
            try:
                if isinstance(line, DataError):
                    raise line
                yield n, parse_json_line(line, f"{file}:{n}")
            except DataError as e:
                bad.append(str(e))
    except DataError as e:
        bad.append(str(e))


HH_ASSISTANT = "\n\nAssistant:"


def split_hh(transcript):
    """A '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript -> (prompt up to and including the last
    '\\n\\nAssistant:', the final response), or None if it has no assistant turn."""
    k = transcript.rfind(HH_ASSISTANT)
    return None if k < 0 else (transcript[:k + len(HH_ASSISTANT)], transcript[k + len(HH_ASSISTANT):])


def hh_pair(rec, where):
    """(prompt, chosen response, rejected response) of one HH record, or a DataError saying why not."""
    chosen, rejected = field(rec, "chosen", str, where), field(rec, "rejected", str, where)
    split = split_hh(chosen)
    if split is None:
        raise DataError(f"{where}: field 'chosen' has no '\\n\\nAssistant:' turn")
    prompt, good = split
    if not rejected.startswith(prompt):
        raise DataError(f"{where}: field 'rejected' does not continue the prompt of 'chosen'")
    bad = rejected[len(prompt):]
    if not good.strip() or not bad.strip():
        raise DataError(f"{where}: empty response in 'chosen' or 'rejected'")
    return prompt, good, bad


def records(file, bad, read):
    """read(record, 'file:line') of each record of a JSON-lines file, leniently: a line that cannot
    be read, or whose fields are not what read() needs (a DataError from data.field), is skipped and
    its reason goes to `bad`."""
    for n, rec in json_lines(file, bad):
        try:
            yield read(rec, f"{file}:{n}")
        except DataError as e:
            bad.append(str(e))


def load_hh(folder):
    """Anthropic HH-RLHF: train.jsonl(.gz) and test.jsonl(.gz) of {"chosen", "rejected"} transcripts.
    SFT on the chosen responses, preferences from the train pairs, prompts from train and test."""
    bad, task = [], {n: [] for n in TASK_FILES}
    for split, names in (("train", ["train.jsonl.gz", "train.jsonl"]), ("test", ["test.jsonl.gz", "test.jsonl"])):
        file = first_file(folder, names)
        for pair in records(file, bad, hh_pair):
            if split == "train":
                task["sft"].append({"prompt": pair[0], "response": pair[1]})
                task["prefs"].append({"prompt": pair[0], "chosen": pair[1], "rejected": pair[2]})
            else:
                task["eval_prompts"].append({"prompt": pair[0]})
    return finish_task(task, folder, bad), bad


def tldr_prompt(rec, where, at=""):
    """The TL;DR prompt format of Stiennon et al. (2020), as DPO used it, from the post's fields
    (under `at`: 'info.' in a comparison)."""
    subreddit, title, post = (field(rec, at + k, str, where) for k in ("subreddit", "title", "post"))
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def tldr_post(rec, where):
    """(prompt, summary) of one post of train.jsonl or test.jsonl."""
    return tldr_prompt(rec, where), " " + field(rec, "summary", str, where).strip()


def tldr_comparison(rec, where):
    """(split, prompt, chosen, rejected) of one human comparison of two summaries."""
    texts = [" " + field(rec, f"summaries[{k}].text", str, where).strip() for k in (0, 1)]
    if len(field(rec, "summaries", list, where)) != 2:
        raise DataError(f"{where}: field 'summaries' should hold 2 summaries, got {len(rec['summaries'])}")
    choice = field(rec, "choice", int, where, lo=0, hi=1)
    split = field(rec, "split", str, where) if "split" in rec else "train"
    return split, tldr_prompt(rec, where, "info."), texts[choice], texts[1 - choice]


def load_tldr(folder):
    """Reddit TL;DR as released with "Learning to summarize from human feedback": train.jsonl and
    test.jsonl (or valid.jsonl) of {"subreddit", "title", "post", "summary"}, and comparisons/*.json of
    {"info": {"subreddit", "title", "post"}, "summaries": [{"text"}, {"text"}], "choice": 0 or 1}."""
    bad, task = [], {n: [] for n in TASK_FILES}
    for split, names in (("train", ["train.jsonl"]), ("test", ["test.jsonl", "valid.jsonl"])):
        file = first_file(folder, names)
        for prompt, summary in records(file, bad, tldr_post):
            if split == "train":
                task["sft"].append({"prompt": prompt, "response": summary})
            else:
                task["eval_prompts"].append({"prompt": prompt})
    comparisons = os.path.join(folder, "comparisons")
    files = sorted(os.path.join(comparisons, f) for f in os.listdir(comparisons)) if os.path.isdir(comparisons) else []
    bad += [f"{f}: not a comparisons file (*.json or *.jsonl), ignored" for f in files
            if not (os.path.isfile(f) and f.endswith((".json", ".jsonl")))]  # .DS_Store, a subfolder...
    files = [f for f in files if os.path.isfile(f) and f.endswith((".json", ".jsonl"))]
    if not files:
        raise DataError(f"{comparisons}: no comparison files (comparisons/*.json from summarize-from-feedback)")
    for file in files:
        for split, prompt, chosen, rejected in records(file, bad, tldr_comparison):
            if split.startswith("train"):
                task["prefs"].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return finish_task(task, folder, bad), bad


def finish_task(task, folder, bad):
    """Alignment prompts: the distinct training prompts. Every file must have records."""
    task["align_prompts"] = [{"prompt": p} for p in dict.fromkeys(r["prompt"] for r in task["sft"])]
    task["eval_prompts"] = [{"prompt": p} for p in dict.fromkeys(r["prompt"] for r in task["eval_prompts"])]
    for name in ("sft", "prefs", "eval_prompts"):
        if not task[name]:
            raise DataError(f"{folder}: no usable records for {name}" + (f" (first problem: {bad[0]})" if bad else ""))
    return task
