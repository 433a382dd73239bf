"""
tools/plan.py: what `python train.py --plan` does. Every check a run's options and files allow before
the run starts, in seconds, then the run's stages with their estimated time and peak GPU memory: a
missing file or a bad combination of options shows now, not after hours of SFT. Nothing is written
and nothing is trained.

    python train.py --preset=presets/gpt2-hh.json --plan
    torchrun --standalone --nproc_per_node=8 train.py --preset=presets/gpt2-hh.json --methods=vcb,dpo --plan

What it checks, each failure one line naming the file or the option:
  - the options together, for as many processes as the launcher starts (train.py's own checks, which
    also refuse PPO and RLOO under torchrun);
  - the data set's files: each one there, and its first record read as the data stage reads it;
  - the tokenizer: GPT-2's built from its vocab.bpe and encoder.json (the BPE is trained later, by
    the data stage);
  - the GPT-2 weights: their keys and shapes from the safetensors header against our GPT's, on the
    meta device (no weight is loaded), and against the tokenizer's vocabulary and --block_size;
  - with --stage=NAME, the files of the earlier stages that the stage reads.
The estimates are tools/bench.py's, for the model and options of this run.
"""
import glob
import os

import torch

import data
import vcb
from machinery.config import STAGES, method_list
from machinery.files import DataError, check_file, field
from machinery.runtime import model_args
from model import GPTConfig
from tasks import corpora
from tools import bench, gpt2


def plan(cfg, world, stage_tasks, gpt2_folder):
    """Check what the run of cfg needs and print the plan. world: the processes the launcher starts
    (the options were checked for them by runtime.start); stage_tasks(cfg, stage): train.py's tasks of
    a stage, whose inputs are checked; gpt2_folder: where --tokenizer=gpt2 reads GPT-2's files."""
    lines = [f"plan of {'--preset=' + cfg.preset if cfg.preset else 'this run'}: {world} process{'es' * (world > 1)}, "
             f"device {device(cfg)}; the options fit together"]
    lines += data_files(cfg)
    if cfg.tokenizer == "gpt2":
        enc = data.gpt2_tokenizer(gpt2_folder)
        vocab = enc.n_vocab
        lines.append(f"tokenizer: GPT-2's, from {os.path.join(gpt2_folder, 'vocab.bpe')} and encoder.json: {vocab:,} tokens")
    else:
        vocab = cfg.vocab_size
        lines.append(f"tokenizer: a BPE of at most {vocab:,} tokens, trained by the data stage on the SFT text")
    if cfg.init_from != "scratch":
        if not os.path.exists(cfg.init_from):
            raise DataError(f"--init_from={cfg.init_from}: no such file (python -m tools.prepare gpt2 fetches GPT-2 small's)")
        args = gpt2.pretrained_config(cfg.init_from, log=lines.append)
        if args["vocab_size"] != vocab:
            raise DataError(f"{cfg.init_from}: vocab_size is {args['vocab_size']} but the tokenizer has {vocab} tokens "
                            f"(GPT-2 weights need --tokenizer=gpt2, with the files that came with them)")
        if args["block_size"] < cfg.block_size:
            raise DataError(f"{cfg.init_from}: has {args['block_size']} positions, fewer than --block_size={cfg.block_size}")
        shape = GPTConfig(**{**args, "block_size": cfg.block_size})
        lines.append(f"weights: {cfg.init_from}: {shape.n_layer} layers x {shape.n_embd}, {shape.n_head} heads, "
                     f"{args['block_size']} positions (cropped to {cfg.block_size}), {args['vocab_size']:,} tokens: every key "
                     f"and shape fits")
    else:
        shape = GPTConfig(**model_args(cfg, vocab))
        lines.append(f"weights: from scratch, {shape.n_layer} layers x {shape.n_embd}, {shape.n_head} heads")
    lines += earlier_outputs(cfg, stage_tasks)
    methods = method_list(cfg)
    offline, online = [m for m in methods if not vcb.METHODS[m].online], [m for m in methods if vcb.METHODS[m].online]
    lines.append("methods: " + "; ".join(part for part in (
        f"{', '.join(offline)} on the scored candidates" if offline else "",
        f"{', '.join(online)} online, in one process" if online else "") if part))
    stages = STAGES if cfg.stage == "all" else [cfg.stage]
    lines.append(f"stages: {', '.join(stages)}, into {cfg.out_dir}/" +
                 (" (it exists: stages whose outputs are up to date are skipped)" if os.path.isdir(cfg.out_dir) else ""))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun every process checks; one prints
    print("\n".join(lines))
    rows = [r for r in bench.estimates(cfg, shape, world) if r[0].split(":")[0] in stages]
    what = f"{cfg.preset or 'this run'} with this model ({num_params(shape) / 1e6:.3g}M parameters)"
    bench.print_estimates(rows, what + (f", on each of {world} GPUs" if world > 1 else ", on one GPU"))
    peak = max(r[2] for r in rows)
    if torch.cuda.is_available() and peak > 0.9 * torch.cuda.get_device_properties(0).total_memory:
        print(f"memory: the largest stage is estimated at {peak / 2**30:.1f} GiB, more than this GPU's "
              f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB holds with room to spare: raise "
              f"--grad_accum, lower --eval_batch or --sample_batch")
    print("\nplan: everything this run reads is here and readable; run the same command without --plan to start it")


def device(cfg):
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return "cpu (no CUDA GPU here: the estimates below are for one)" if not torch.cuda.is_available() else "cpu"
    return f"{cfg.device} ({torch.cuda.get_device_name() if torch.cuda.is_available() else 'not visible here'})"


def num_params(shape):
    from model import GPT
    with torch.device("meta"):
        return GPT(shape).num_params()


def first_record(file, read):
    """The first record of a data file that read(record, 'file:line') accepts, as the data stage reads
    it (hh and tldr leniently: bad records before it are skipped); a DataError if there is none."""
    check_file(file)
    bad = []
    for record in corpora.records(file, bad, read):
        return record
    raise DataError(f"{file}: no usable record" + (f" (first problem: {bad[0]})" if bad else ""))


def schema(name):
    """A reader of one record of our own JSON-lines files, checked strictly against data.SCHEMAS."""
    def read(rec, where):
        for key, kind in data.SCHEMAS[name].items():
            field(rec, key, kind, where)
        return rec
    return read


def data_files(cfg):
    """The data set's files, each present with a readable first record: the lines to print."""
    if cfg.data == "builtin":
        return [f"data: the built-in task, made by the data stage (seed {cfg.seed})"]
    folder = cfg.data_dir
    if not os.path.isdir(folder):
        fetch = f": python -m tools.prepare {'hh' if cfg.data == 'hh' else 'tldr'} fetches it" if cfg.data in ("hh", "tldr") else ""
        raise DataError(f"--data_dir={folder}: no such folder{fetch}")
    if cfg.data == "jsonl":
        files = [(os.path.join(folder, f"{n}.jsonl"), schema(n)) for n in data.TASK_FILES if n != "ood_prompts"]
    elif cfg.data == "hh":
        files = [(corpora.first_file(folder, [f"{s}.jsonl.gz", f"{s}.jsonl"]), corpora.hh_pair) for s in ("train", "test")]
    else:
        files = [(corpora.first_file(folder, ["train.jsonl"]), corpora.tldr_post),
                 (corpora.first_file(folder, ["test.jsonl", "valid.jsonl"]), corpora.tldr_post)]
        comparisons = sorted(f for f in glob.glob(os.path.join(folder, "comparisons", "*.json*")) if f.endswith((".json", ".jsonl")))
        if not comparisons:
            raise DataError(f"{os.path.join(folder, 'comparisons')}: no comparison files (python -m tools.prepare tldr fetches them)")
        files += [(f, corpora.tldr_comparison) for f in comparisons]
    if os.path.exists(os.path.join(folder, "ood_prompts.jsonl")):
        files.append((os.path.join(folder, "ood_prompts.jsonl"), schema("ood_prompts")))
    for file, read in files:
        first_record(file, read)
    names = [os.path.relpath(f, folder) for f, _ in files]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return [f"data: {cfg.data} in {folder}: {shown}: each one's first record reads as the data stage reads it"]


def earlier_outputs(cfg, stage_tasks):
    """With --stage=NAME, the files it reads that earlier stages write must be there."""
    if cfg.stage in ("all", "data"):
        return []
    skip = {os.path.abspath(cfg.init_from)}  # checked above
    missing = [f for task, _ in stage_tasks(cfg, cfg.stage) for f in task.inputs
               if os.path.abspath(f) not in skip and not os.path.exists(f)]
    if missing:
        raise DataError(f"{missing[0]}: missing, and --stage={cfg.stage} reads it: run the stages before it first "
                        f"(python train.py without --stage runs them all)")
    return [f"earlier stages: the files --stage={cfg.stage} reads are in {cfg.out_dir}/"]
