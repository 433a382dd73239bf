"""
train.py: the VCB pipeline (PAPER.md, "The pipeline"), stage by stage, in flat PyTorch loops.

    python train.py                         # every stage; about 3 minutes on a 2-core CPU
    python train.py --stage=align --force   # redo one stage
    python train.py --sweep                 # every method over several betas and seeds -> frontier
    python train.py --help                  # every option, with its default and meaning
    torchrun --nproc_per_node=2 train.py    # data parallel (GPUs with NCCL, or CPU processes with gloo)

Stages, each reading the previous one's files in --out_dir. A stage is skipped when its outputs exist
and were made with the same settings (stages.json records them); --force redoes it.
    data    the task's files (data/*.jsonl) and the tokenizer (tokenizer.json)
    sft     supervised fine-tuning on the demonstrations                      -> sft.pt
    rm      reward model from the SFT weights, Bradley-Terry loss on pairs      -> rm.pt
    sample  n candidates per prompt from SFT, RM scores, SFT log-probs          -> candidates.jsonl
    align   VCB and every baseline, each from SFT, on the same candidates      -> policy_<method>.pt
    eval    gold and RM reward, KL to SFT, win rates, diversity               -> results.json, frontier.png
"""
import dataclasses
import difflib
import json
import math
import os
import pickle
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import report
import vcb
from data import DataError
from model import GPT, GPTConfig

STAGES = ["data", "sft", "rm", "sample", "align", "eval"]
METHODS = ["vcb", "dpo", "ipo", "slic", "rrhf"]
PAIR_LOSSES = {"dpo": vcb.dpo_loss, "ipo": vcb.ipo_loss, "slic": vcb.slic_loss}


@dataclass
class Config:
    # ---- run
    out_dir: str = "out"             # every file of the run goes here
    stage: str = "all"               # data, sft, rm, sample, align, eval, or all (in that order)
    force: bool = False              # redo the chosen stages even when their outputs are up to date
    sweep: bool = False              # then align + eval every method over sweep_betas x sweep_seeds
    sweep_betas: str = "0.1,0.3,1,3"  # betas of --sweep
    sweep_seeds: str = "0,1,2"       # seeds of --sweep: alignment batch order and evaluation samples
    seed: int = 0                    # seed of the data, initialisation, batch order and sampling
    device: str = "auto"             # auto (cuda when there is one, else cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"              # auto (bfloat16 autocast on CUDA, float32 on CPU), float32, bfloat16, float16
    compile: bool = False            # torch.compile the model for training (CUDA; slow first steps)
    # ---- data
    data: str = "builtin"            # builtin (reviews with a gold reward), hh, tldr, or jsonl (your own files)
    data_dir: str = ""               # folder of the hh, tldr or jsonl files (README: "Your own data")
    tokenizer: str = "bpe"           # bpe: trained here on the SFT text; gpt2: tiktoken's, from a local cache
    vocab_size: int = 1024           # bpe: vocabulary size, <|endoftext|> included
    n_sft: int = 4000                # SFT demonstrations (hh, tldr, jsonl: at most this many, 0 for all)
    n_prefs: int = 3000              # preference pairs for the reward model (likewise)
    n_align: int = 320               # prompts that get n_candidates scored candidates each (likewise)
    n_eval: int = 128                # held-out prompts, and as many out-of-distribution ones (likewise)
    pref_tau: float = 0.25           # builtin: Bradley-Terry temperature of the labels on the gold reward
    # ---- model
    init_from: str = "scratch"       # scratch, or the path of a GPT-2 model.safetensors (needs --tokenizer=gpt2)
    n_layer: int = 3                 # transformer blocks
    n_head: int = 4                  # attention heads
    n_embd: int = 96                 # residual width
    block_size: int = 128            # longest prompt + response, in tokens
    dropout: float = 0.0             # dropout in SFT and RM training (alignment always runs without)
    # ---- optimisation, every stage
    weight_decay: float = 0.1        # AdamW decay on weight matrices
    grad_clip: float = 1.0           # clip the gradient norm (0: off)
    warmup_steps: int = 10           # linear learning-rate warm-up, then cosine decay to lr/10
    grad_accum: int = 1              # micro-batches per step; the batch sizes below are per step, all processes together
    # ---- sft
    sft_steps: int = 300             # optimizer steps
    sft_batch: int = 64              # demonstrations per step
    sft_lr: float = 3e-3             # peak learning rate
    # ---- rm
    rm_steps: int = 150              # optimizer steps
    rm_batch: int = 32               # preference pairs per step
    rm_lr: float = 1e-3              # peak learning rate
    rm_holdout: float = 0.1          # share of the pairs kept out of training to measure accuracy
    # ---- sample
    n_candidates: int = 8            # candidates per prompt (n in PAPER.md)
    max_new_tokens: int = 48         # longest response
    temperature: float = 1.0         # sampling temperature of the candidates
    top_k: int = 0                   # top-k of the candidates (0: off)
    top_p: float = 1.0               # top-p of the candidates (1: off)
    sample_batch: int = 64           # prompts per generate() call; each call has its own seed
    # ---- align
    methods: str = "vcb,dpo,ipo,slic,rrhf"  # comma-separated, from vcb, dpo, ipo, slic, rrhf
    beta: float = 1.0                # KL strength beta of every method (VCB: the reward gap / (beta sigma))
    lam: float = 0.1                 # VCB: LogSumExp temperature over a prompt's pairs (0: plain mean)
    sigma_floor: float = 1e-6        # VCB: prompts whose reward spread is under this are skipped
    align_steps: int = 60            # optimizer steps per method
    align_batch: int = 8             # prompts per step, each with all its candidates
    align_lr: float = 1e-3           # peak learning rate
    # ---- eval
    eval_samples: int = 2            # samples per prompt and policy, at temperature 1 with no top-k/top-p
    eval_batch: int = 256            # sequences per forward pass when scoring
    # ---- logging and checkpoints
    log_interval: int = 20           # steps between printed log lines
    ckpt_interval: int = 50          # steps between resumable checkpoints


# settings each stage's outputs depend on, besides those of the stages before it
STAGE_KEYS = {
    "data": ["data", "data_dir", "tokenizer", "vocab_size", "n_sft", "n_prefs", "n_align", "n_eval",
             "pref_tau", "seed"],
    "sft": ["init_from", "n_layer", "n_head", "n_embd", "block_size", "dropout", "weight_decay",
            "grad_clip", "warmup_steps", "sft_steps", "sft_batch", "sft_lr"],
    "rm": ["rm_steps", "rm_batch", "rm_lr", "rm_holdout"],
    "sample": ["n_candidates", "max_new_tokens", "temperature", "top_k", "top_p", "sample_batch"],
    "align": ["beta", "lam", "sigma_floor", "align_steps", "align_batch", "align_lr"],
    "eval": ["methods", "eval_samples"],
}


class ConfigError(ValueError):
    """A bad command-line option, with a one-line message."""


class TrainingError(RuntimeError):
    """Training had to stop (a non-finite loss), with a one-line message."""


# -----------------------------------------------------------------------------
# configuration

def parse_args(argv):
    """--key=value options onto Config, each converted to its field's type; bare --flag sets a bool."""
    cfg, fields = Config(), {f.name: f for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage())
            sys.exit(0)
        m = re.fullmatch(r"--([A-Za-z_0-9]+)(?:=(.*))?", arg, re.S)
        if not m:
            raise ConfigError(f"cannot read {arg!r}: options look like --key=value (python train.py --help)")
        key, raw = m.groups()
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"unknown option --{key}" + (f"; did you mean --{near[0]}?" if near else
                                                           " (python train.py --help lists them)"))
        kind = type(getattr(Config, key))
        if raw is None and kind is not bool:
            raise ConfigError(f"--{key} needs a value: --{key}=<{kind.__name__}>")
        setattr(cfg, key, convert(key, "true" if raw is None else raw, kind))
    validate(cfg)
    return cfg


def convert(key, raw, kind):
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        return kind(raw)  # int("1.5") fails, float("0") is 0.0
    except ValueError:
        raise ConfigError(f"--{key}={raw}: expected {kind.__name__}") from None


def validate(cfg):
    choices = dict(stage=STAGES + ["all"], data=["builtin", "hh", "tldr", "jsonl"], tokenizer=["bpe", "gpt2"],
                   dtype=["auto", "float32", "bfloat16", "float16"])
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: expected one of {', '.join(allowed)}")
    for m in method_list(cfg):
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    for f in dataclasses.fields(Config):
        v = getattr(cfg, f.name)
        may_be_zero = ("seed", "lam", "top_k", "grad_clip", "warmup_steps", "sigma_floor", "dropout", "rm_holdout")
        if cfg.data != "builtin":
            may_be_zero += ("n_sft", "n_prefs", "n_align", "n_eval")  # 0: every record
        if f.type in (int, float) and f.name not in may_be_zero and v <= 0:
            raise ConfigError(f"--{f.name}={v}: must be positive")
    for key in ("lam", "top_k", "grad_clip", "warmup_steps", "sigma_floor", "seed"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must be >= 0")
    if not 0 <= cfg.dropout < 1 or not 0 < cfg.top_p <= 1 or not 0 <= cfg.rm_holdout < 1:
        raise ConfigError("--dropout and --rm_holdout must be in [0, 1), --top_p in (0, 1]")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")
    if cfg.max_new_tokens >= cfg.block_size:
        raise ConfigError(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in --block_size={cfg.block_size}")
    if cfg.data != "builtin" and not cfg.data_dir:
        raise ConfigError(f"--data={cfg.data} needs --data_dir=<folder with its files>")
    for key in ("sweep_betas", "sweep_seeds"):
        try:
            [float(v) for v in getattr(cfg, key).split(",")]
        except ValueError:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: expected comma-separated numbers") from None


def method_list(cfg):
    return [m.strip() for m in cfg.methods.split(",") if m.strip()]


def usage():
    """Every option with its default and the comment beside it in Config."""
    import inspect
    lines = [__doc__.strip(), "", "Options (--key=value):"]
    for line in inspect.getsource(Config).splitlines()[2:]:
        m = re.match(r"\s+(\w+): \w+ = (.+?)\s+# (.*)", line)
        if m:
            lines.append(f"  --{m[1]}={m[2].strip(chr(34))}".ljust(40) + m[3])
        elif line.strip().startswith("# ----"):
            lines.append(" " + line.strip()[6:])
    return "\n".join(lines)


def stage_settings(cfg, stage, **extra):
    """The settings a stage's outputs depend on: its own keys and every earlier stage's."""
    keys = [k for s in STAGES[:STAGES.index(stage) + 1] for k in STAGE_KEYS[s]]
    return {**{k: getattr(cfg, k) for k in keys}, **extra}


# -----------------------------------------------------------------------------
# devices, processes, precision

@dataclass
class Env:
    device: str          # where the models live
    device_type: str     # cuda or cpu (for autocast and the fused optimizer)
    dtype: torch.dtype   # autocast dtype; float32 means no autocast
    rank: int            # this process in a torchrun group (0 alone)
    world: int           # processes in the group (1 alone)

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def setup(cfg):
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={device} but PyTorch sees no CUDA device")
    rank, world = 0, 1
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device_type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed for float32 work on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    return Env(device, device_type, dtype, rank, world)


def log(env, msg):
    if env.master:
        tqdm.write(msg)


def gather(env, items):
    """Every process's list, concatenated in rank order (the identity when alone)."""
    if env.world == 1:
        return items
    parts = [None] * env.world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier(env):
    if env.world > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# files: checkpoints, stage records

def path(cfg, *parts):
    return os.path.join(cfg.out_dir, *parts)


def save_checkpoint(file, payload):
    with data.atomic_path(file) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(file):
    """torch.load with weights_only=True: tensors and plain values only; a pickle could run code."""
    if not os.path.exists(file):
        raise DataError(f"{file}: no such checkpoint (run the stage that writes it first)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()[0][:160]
        raise DataError(f"{file}: refused: it holds pickled Python objects, which could run code ({detail})") from None
    except Exception as e:
        raise DataError(f"{file}: not a readable checkpoint ({type(e).__name__}: {str(e)[:160]})") from None


def model_args(cfg, vocab_size):
    return dict(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_embd=cfg.n_embd, dropout=cfg.dropout, bias=True, reward_head=False)


def load_model(file, env, enc, cfg, reward_head=None, dropout=0.0):
    """A GPT from one of our checkpoints, checked against the tokenizer and this run's model
    settings. reward_head=True on an SFT checkpoint starts a reward model: SFT's weights, a new head.
    dropout: 0 for scoring and alignment (dropout would make log pi(y|x) noisy)."""
    ck = load_checkpoint(file)
    args = ck.get("model_args")
    if not isinstance(args, dict) or "model" not in ck:
        raise DataError(f"{file}: not a checkpoint of this project (no model_args / model)")
    if args.get("vocab_size") != enc.n_vocab:
        raise DataError(f"{file}: vocab_size is {args.get('vocab_size')} in the checkpoint but the tokenizer has "
                        f"{enc.n_vocab} tokens: it was made with another tokenizer")
    for key in ("n_layer", "n_head", "n_embd", "block_size") if cfg.init_from == "scratch" else ("block_size",):
        if args.get(key) != getattr(cfg, key):
            raise DataError(f"{file}: {key} is {args.get(key)} in the checkpoint but --{key}={getattr(cfg, key)} in this "
                            f"run: redo the stage that wrote it with these settings, or use another --out_dir")
    new_head = reward_head and not args.get("reward_head")
    args = {**args, "dropout": dropout, "reward_head": bool(reward_head or args.get("reward_head"))}
    try:
        model = GPT(GPTConfig(**args))
        missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    except (TypeError, RuntimeError) as e:
        raise DataError(f"{file}: weights do not fit the model it describes ({str(e).splitlines()[0][:200]})") from None
    if unexpected or (missing and not (new_head and set(missing) == {"reward_head.weight", "reward_head.bias"})):
        raise DataError(f"{file}: weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(env.device)


def read_records(cfg):
    try:
        with open(path(cfg, "stages.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def up_to_date(cfg, env, task, settings, outputs, stage=None):
    """True (and says so) when a task's outputs exist and were made with these settings, unless
    --force. Otherwise the task will run: its inputs (the outputs of the stages before `stage`,
    default the task itself) must then have been made with this run's settings too, or a stage run
    alone would silently build on stale files."""
    if not cfg.force and all(os.path.exists(o) for o in outputs) and read_records(cfg).get(task) == settings:
        log(env, f"{task}: up to date")
        return True
    stage = stage or task
    inputs = [(s, stage_settings(cfg, s)) for s in STAGES[:STAGES.index(stage)] if s != "align"]
    if stage == "eval":
        inputs += [(f"align-{m}", stage_settings(cfg, "align", method=m, align_seed=cfg.seed)) for m in method_list(cfg)]
    records = read_records(cfg)
    for name, want in inputs:
        have = records.get(name)
        if have is not None and have != want:
            diff = ", ".join(f"{k}={have.get(k)} (now {want[k]})" for k in want if have.get(k) != want[k])
            raise ConfigError(f"{name} outputs in {cfg.out_dir} were made with {diff}: run --stage={name.split('-')[0]} "
                              f"first (or every stage), or use another --out_dir")
    return False


def mark_done(cfg, env, task, settings):
    if env.master:
        records = read_records(cfg)
        records[task] = settings
        data.write_json(path(cfg, "stages.json"), records)


# -----------------------------------------------------------------------------
# the one training loop: SFT, reward model and alignment

def batch_indices(n, batch_size, step, seed):
    """The examples of a step: a fresh permutation of range(n) every epoch, a function of (seed, step)
    alone, so a resumed run sees exactly the batches the uninterrupted run would have seen."""
    out, start = [], step * batch_size
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, n)
        if k == start or pos == 0:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(perm[pos])
    return out


def lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(cfg, env, name, model, n_examples, steps, batch_size, lr, loss_fn, count_fn, settings, seed):
    """Optimise model for `steps` steps; returns the trained (unwrapped) model.

    Each step takes batch_size example indices (all processes together): this process takes every
    world-th one and splits them into grad_accum micro-batches. loss_fn(model, indices) -> (summed
    loss of those examples, metrics); count_fn(indices) -> how many items (tokens, pairs, prompts)
    the summed loss counts. Dividing by the whole step's count makes the gradient the same mean over
    items whatever the number of processes and micro-batches.
    Resumable: every ckpt_interval steps the model, optimizer, step and random state go to
    <name>.ckpt.pt, and a run with the same settings continues from there."""
    if batch_size < env.world * cfg.grad_accum:
        raise ConfigError(f"{name}: a batch of {batch_size} cannot feed {env.world} processes x {cfg.grad_accum} micro-batches")
    optimizer = model.configure_optimizers(cfg.weight_decay, lr, (0.9, 0.95), env.device_type)
    scaler = torch.amp.GradScaler(env.device_type, enabled=env.dtype == torch.float16)
    ckpt_file, start = path(cfg, f"{name}.ckpt.pt"), 0
    if os.path.exists(ckpt_file):
        ck = load_checkpoint(ckpt_file)
        if ck.get("settings") == settings:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            torch.set_rng_state(ck["rng"])
            if env.device_type == "cuda" and "cuda_rng" in ck:
                torch.cuda.set_rng_state(ck["cuda_rng"], env.device)
            start = ck["step"]
            log(env, f"{name}: resuming from {ckpt_file} at step {start}")
        else:
            log(env, f"{name}: {ckpt_file} was made with other settings; starting over")
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if env.world > 1:
        model = DDP(model, device_ids=[env.device] if env.device_type == "cuda" else None)
    model.train()
    last_good = start if start else None
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, disable=not env.master,
               dynamic_ncols=True, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup_steps)
        idx = batch_indices(n_examples, batch_size, step, seed)
        total = max(count_fn(idx), 1)
        mine = idx[env.rank::env.world]
        micro = [mine[k::cfg.grad_accum] for k in range(cfg.grad_accum)]
        step_loss, metrics = torch.zeros((), device=env.device), {}
        for k, mb in enumerate(micro):
            sync = model.no_sync() if env.world > 1 and k < len(micro) - 1 else nullcontext()
            with sync:
                with env.autocast():
                    loss_sum, m = loss_fn(model, mb)
                loss = loss_sum * env.world / total  # DDP averages gradients over processes
                scaler.scale(loss).backward()
            step_loss += loss.detach() / env.world
            for key, v in m.items():
                metrics[key] = metrics.get(key, 0.0) + v / len(micro)
        if env.world > 1:
            dist.all_reduce(step_loss)
        if not torch.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)
            kept = f"the last good checkpoint, {ckpt_file} (step {last_good}), is kept" if last_good else "no checkpoint was written yet"
            raise TrainingError(f"{name}: the loss is {step_loss.item()} at step {step}; stopped, and {kept}")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": step_loss.item(), **metrics}
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()})
        if (step + 1) % cfg.log_interval == 0 or step + 1 == steps:
            log(env, f"{name} step {step + 1}/{steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if (step + 1) % cfg.ckpt_interval == 0 and step + 1 < steps:
            if env.master:
                state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                         "step": step + 1, "settings": settings}
                if env.device_type == "cuda":
                    state["cuda_rng"] = torch.cuda.get_rng_state(env.device)
                save_checkpoint(ckpt_file, state)
            last_good = step + 1
    bar.close()
    return raw


def finish(cfg, env, name, model, file, settings, **extra):
    """Write a trained model atomically, then drop its resumable checkpoint."""
    if env.master:
        save_checkpoint(file, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                               "config": dataclasses.asdict(cfg), **extra})
        if os.path.exists(path(cfg, f"{name}.ckpt.pt")):
            os.remove(path(cfg, f"{name}.ckpt.pt"))
    barrier(env)


# -----------------------------------------------------------------------------
# stage: data

def stage_data(cfg, env):
    settings = stage_settings(cfg, "data")
    outputs = [path(cfg, "data", f"{n}.jsonl") for n in data.TASK_FILES if n != "ood_prompts"] + [path(cfg, "tokenizer.json")]
    if up_to_date(cfg, env, "data", settings, outputs):
        return
    if env.master:
        if cfg.data == "builtin":
            task = data.builtin_task(cfg.seed, cfg.n_sft, cfg.n_prefs, cfg.n_align, cfg.n_eval, cfg.n_eval, cfg.pref_tau)
        else:
            limits = dict(sft=cfg.n_sft, prefs=cfg.n_prefs, align_prompts=cfg.n_align, eval_prompts=cfg.n_eval,
                          ood_prompts=cfg.n_eval)
            task, notes = data.load_task(cfg.data, cfg.data_dir, limits, cfg.seed)
            for note in notes:
                log(env, note)
        for name in data.TASK_FILES:
            if task.get(name):
                data.write_jsonl(path(cfg, "data", f"{name}.jsonl"), task[name])
            elif os.path.exists(path(cfg, "data", f"{name}.jsonl")):
                os.remove(path(cfg, "data", f"{name}.jsonl"))
        t0 = time.time()
        if cfg.tokenizer == "bpe":
            text = "\n".join(r["prompt"] + r["response"] for r in task["sft"])[:5_000_000]
            enc = data.train_bpe(text, cfg.vocab_size)
        else:
            enc = data.gpt2_tokenizer()
        data.save_tokenizer(enc, path(cfg, "tokenizer.json"))
        log(env, f"data: {', '.join(f'{len(task[n])} {n}' for n in data.TASK_FILES if task.get(n))}; "
                 f"tokenizer {enc.name} with {enc.n_vocab} tokens ({time.time() - t0:.1f}s)")
    barrier(env)
    mark_done(cfg, env, "data", settings)


def load_data(cfg, name):
    file = path(cfg, "data", f"{name}.jsonl")
    if name == "ood_prompts" and not os.path.exists(file):
        return []  # out-of-distribution prompts are optional
    if not os.path.exists(file):
        raise DataError(f"{file}: missing; run --stage=data first")
    return data.read_jsonl(file, data.SCHEMAS[name])


def load_tokenizer(cfg):
    if not os.path.exists(path(cfg, "tokenizer.json")):
        raise DataError(f"{path(cfg, 'tokenizer.json')}: missing; run --stage=data first")
    return data.load_tokenizer(path(cfg, "tokenizer.json"))


def encode_all(cfg, env, enc, pairs, what):
    """(prompt, response) pairs -> [(ids, response start)], logging how many were cut to fit."""
    out, cut = [], 0
    for prompt, response in pairs:
        ids, start, truncated = data.encode_example(enc, prompt, response, cfg.block_size)
        out.append((ids, start))
        cut += truncated
    if cut:
        log(env, f"{what}: {cut} of {len(out)} sequences were longer than block_size={cfg.block_size}; "
                 f"prompts were cut from the left (responses from the right where they alone did not fit)")
    return out


# -----------------------------------------------------------------------------
# stage: sft

def stage_sft(cfg, env):
    settings = stage_settings(cfg, "sft")
    if up_to_date(cfg, env, "sft", settings, [path(cfg, "sft.pt")]):
        return
    enc, records = load_tokenizer(cfg), load_data(cfg, "sft")
    examples = encode_all(cfg, env, enc, [(r["prompt"], r["response"]) for r in records], "sft")
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(**model_args(cfg, enc.n_vocab)))
    else:
        try:
            model = GPT.from_pretrained(cfg.init_from, block_size=cfg.block_size, dropout=cfg.dropout)
        except ValueError as e:
            raise DataError(str(e)) from None
        if model.config.vocab_size != enc.n_vocab:
            raise DataError(f"{cfg.init_from}: vocab_size is {model.config.vocab_size} but the tokenizer has {enc.n_vocab} "
                            f"tokens (GPT-2 weights need --tokenizer=gpt2)")
        if model.config.block_size < cfg.block_size:
            raise DataError(f"{cfg.init_from}: has {model.config.block_size} positions, fewer than --block_size={cfg.block_size}")
    model.to(env.device)
    log(env, f"sft: {model.num_params() / 1e6:.2f}M parameters, {len(examples)} demonstrations")

    def loss_fn(m, idx):  # summed NLL of the response tokens (the prompt is given, not learned)
        x, mask = data.collate([examples[i] for i in idx], enc.eot_token)
        x, mask = x.to(env.device), mask.to(env.device)
        logp = m(x[:, :-1], targets=x[:, 1:])                     # (B, T-1) float32
        return -(logp * mask[:, 1:]).sum(), {}

    def count_fn(idx):  # response tokens in the step
        return sum(len(examples[i][0]) - examples[i][1] for i in idx)

    model = train(cfg, env, "sft", model, len(examples), cfg.sft_steps, cfg.sft_batch, cfg.sft_lr,
                  loss_fn, count_fn, settings, cfg.seed)
    finish(cfg, env, "sft", model, path(cfg, "sft.pt"), settings)
    if env.master:
        model.eval()
        prompts = [data.encode_prompt(enc, r["prompt"], cfg.block_size - cfg.max_new_tokens) for r in records[:2]]
        with env.autocast():
            outs = model.generate(prompts, cfg.max_new_tokens, stop_token=enc.eot_token,
                                  generator=torch.Generator(env.device).manual_seed(cfg.seed))
        for r, out in zip(records, outs):
            log(env, f"sft sample: {r['prompt']!r} -> {decode(enc, out)!r}")
    mark_done(cfg, env, "sft", settings)


def decode(enc, tokens):
    """Response text of sampled tokens, without the final <|endoftext|>."""
    return enc.decode([t for t in tokens if t != enc.eot_token])


# -----------------------------------------------------------------------------
# stage: rm

def stage_rm(cfg, env):
    settings = stage_settings(cfg, "rm")
    if up_to_date(cfg, env, "rm", settings, [path(cfg, "rm.pt")]):
        return
    enc, records = load_tokenizer(cfg), load_data(cfg, "prefs")
    n_held = max(1, int(len(records) * cfg.rm_holdout)) if cfg.rm_holdout > 0 and len(records) > 1 else 0
    train_recs, held = records[:len(records) - n_held], records[len(records) - n_held:]
    chosen = encode_all(cfg, env, enc, [(r["prompt"], r["chosen"]) for r in train_recs], "rm chosen")
    rejected = encode_all(cfg, env, enc, [(r["prompt"], r["rejected"]) for r in train_recs], "rm rejected")
    torch.manual_seed(cfg.seed)
    model = load_model(path(cfg, "sft.pt"), env, enc, cfg, reward_head=True, dropout=cfg.dropout)

    def loss_fn(m, idx):  # Bradley-Terry: -log sigmoid(r(x, y_w) - r(x, y_l)), both in one forward
        seqs = [chosen[i] for i in idx] + [rejected[i] for i in idx]
        x, _ = data.collate(seqs, enc.eot_token)
        r = m(x.to(env.device), reward_mask=real_mask([ids for ids, _ in seqs], x.size(1)).to(env.device))
        r_w, r_l = r[:len(idx)], r[len(idx):]
        return -torch.nn.functional.logsigmoid(r_w - r_l).sum(), {"acc": (r_w > r_l).float().mean().item()}

    model = train(cfg, env, "rm", model, len(chosen), cfg.rm_steps, cfg.rm_batch, cfg.rm_lr,
                  loss_fn, len, settings, cfg.seed)
    model.eval()
    metrics = {}
    if held:
        r_w = score_rewards(cfg, env, model, enc, [(r["prompt"], r["chosen"]) for r in held])
        r_l = score_rewards(cfg, env, model, enc, [(r["prompt"], r["rejected"]) for r in held])
        metrics["heldout_accuracy"] = sum(a > b for a, b in zip(r_w, r_l)) / len(held)
        if cfg.data == "builtin":
            gold = data.gold_reward([r["chosen"] for r in held] + [r["rejected"] for r in held])
            metrics["gold_correlation"] = report.pearson(r_w + r_l, gold)
        log(env, "rm: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" on {len(held)} held-out pairs")
    finish(cfg, env, "rm", model, path(cfg, "rm.pt"), settings, metrics=metrics)
    mark_done(cfg, env, "rm", settings)


def real_mask(ids_list, T):
    """(B, T) True on the real tokens of right-padded rows of the given lengths."""
    lengths = torch.tensor([len(ids) for ids in ids_list])
    return torch.arange(T)[None, :] < lengths[:, None]


@torch.no_grad()
def score_rewards(cfg, env, rm, enc, pairs):
    """RM scores r(x, y) of (prompt, response) pairs, in batches of eval_batch."""
    examples = [data.encode_example(enc, p, r, cfg.block_size)[:2] for p, r in pairs]
    out = []
    for k in range(0, len(examples), cfg.eval_batch):
        chunk = examples[k:k + cfg.eval_batch]
        x, _ = data.collate(chunk, enc.eot_token)
        with env.autocast():
            out += rm(x.to(env.device), reward_mask=real_mask([ids for ids, _ in chunk], x.size(1)).to(env.device)).tolist()
    return out


@torch.no_grad()
def score_logps(cfg, env, model, enc, examples):
    """Summed response log-probs of [(ids, start)] under model, float32, in batches of eval_batch."""
    out = []
    for k in range(0, len(examples), cfg.eval_batch):
        x, mask = data.collate(examples[k:k + cfg.eval_batch], enc.eot_token)
        x, mask = x.to(env.device), mask.to(env.device)
        with env.autocast():
            out += vcb.sequence_logps(model(x), x, mask).tolist()
    return out


# -----------------------------------------------------------------------------
# stage: sample

def stage_sample(cfg, env):
    """n candidates per prompt from the SFT model, each scored by the RM, with its SFT log-prob
    (PAPER.md step 2): alignment then needs one model in memory."""
    settings = stage_settings(cfg, "sample")
    out_file = path(cfg, "candidates.jsonl")
    if up_to_date(cfg, env, "sample", settings, [out_file]):
        return
    enc = load_tokenizer(cfg)
    prompts = [r["prompt"] for r in load_data(cfg, "align_prompts")]
    sft = load_model(path(cfg, "sft.pt"), env, enc, cfg).eval()
    max_prompt = cfg.block_size - cfg.max_new_tokens
    long = sum(len(enc.encode_ordinary(p)) + 1 > max_prompt for p in prompts)
    if long:
        log(env, f"sample: {long} prompts are longer than block_size - max_new_tokens = {max_prompt} tokens and are cut from the left")
    # Every chunk is scored on its own, so the candidates file is the same whatever the number of
    # processes. Generation and SFT log-probs first, then the RM (one model at a time).
    n, mine = cfg.n_candidates, []  # per chunk: (its first prompt's index, (prompt, response) pairs, SFT log-probs)
    for c, batch, _, outs in sample_chunks(cfg, env, enc, sft, prompts, cfg.seed, temperature=cfg.temperature,
                                           top_k=cfg.top_k or None, top_p=cfg.top_p, num_samples=n):
        pairs = [(batch[k // n], decode(enc, o)) for k, o in enumerate(outs)]  # prompt-major, n per prompt
        mine.append((c, pairs, score_logps(cfg, env, sft, enc, [data.encode_example(enc, p, y, cfg.block_size)[:2]
                                                                 for p, y in pairs])))
    del sft
    rm = load_model(path(cfg, "rm.pt"), env, enc, cfg).eval()
    records = []
    for c, pairs, logps in mine:
        rewards = score_rewards(cfg, env, rm, enc, pairs)
        if not all(math.isfinite(v) for v in rewards + logps):
            raise TrainingError(f"sample: non-finite scores for the prompts from {c}; check rm.pt and sft.pt")
        for i in range(len(pairs) // n):
            k = slice(i * n, (i + 1) * n)
            records.append({"i": c + i, "prompt": pairs[i * n][0], "responses": [y for _, y in pairs[k]],
                            "rewards": rewards[k], "ref_logps": logps[k]})
    records = sorted(gather(env, records), key=lambda r: r["i"])
    for r in records:
        del r["i"]
    if env.master:
        data.write_jsonl(out_file, records)
        spread = [vcb.reward_sigma(torch.tensor([r["rewards"]])).item() for r in records]
        log(env, f"sample: {len(records)} prompts x {n} candidates; mean RM reward "
                 f"{sum(sum(r['rewards']) for r in records) / (n * len(records)):.3f}, mean sigma(x) {sum(spread) / len(spread):.3f}")
    barrier(env)
    mark_done(cfg, env, "sample", settings)


def sample_chunks(cfg, env, enc, model, prompts, seed, offset=0, desc="sample", **sampling):
    """Generate for prompts in chunks of sample_batch, each chunk with its own seed, the chunks shared
    round-robin by the processes: what a chunk gets does not depend on the number of processes.
    Yields (index of the chunk's first prompt, its prompts, their token ids, the generate() output)."""
    max_prompt = cfg.block_size - cfg.max_new_tokens
    for c in tqdm(list(range(0, len(prompts), cfg.sample_batch))[env.rank::env.world], desc=desc,
                  disable=not env.master, leave=False):
        batch = prompts[c:c + cfg.sample_batch]
        ids = [data.encode_prompt(enc, p, max_prompt) for p in batch]
        g = torch.Generator(env.device).manual_seed(seed * 1_000_003 + offset + c)
        with env.autocast():
            outs = model.generate(ids, cfg.max_new_tokens, stop_token=enc.eot_token, generator=g, **sampling)
        yield c, batch, ids, outs


@dataclass
class Candidates:
    """The scored candidates, ready for alignment: examples[i][k] is (ids, start) of candidate k of
    prompt i; ref_logps and rewards are (B, n) float32."""
    examples: list
    ref_logps: torch.Tensor
    rewards: torch.Tensor


def load_candidates(cfg, env, enc, file=None):
    file = file or path(cfg, "candidates.jsonl")
    if not os.path.exists(file):
        raise DataError(f"{file}: missing; run --stage=sample first")
    records = data.read_jsonl(file, data.SCHEMAS["candidates"])
    n = len(records[0]["responses"])
    for line, r in enumerate(records, 1):
        if len(r["responses"]) < 2:
            raise DataError(f"{file}:{line}: field 'responses' has {len(r['responses'])} candidate; VCB and the baselines need at least 2")
        for key in ("rewards", "ref_logps"):
            if len(r[key]) != len(r["responses"]):
                raise DataError(f"{file}:{line}: field '{key}' has {len(r[key])} values for {len(r['responses'])} responses")
        if len(r["responses"]) != n:
            raise DataError(f"{file}:{line}: field 'responses' has {len(r['responses'])} candidates but line 1 has {n}; "
                            f"every prompt needs the same number")
    flat = encode_all(cfg, env, enc, [(r["prompt"], y) for r in records for y in r["responses"]], "candidates")
    examples = [flat[i * n:(i + 1) * n] for i in range(len(records))]
    return Candidates(examples, torch.tensor([r["ref_logps"] for r in records]),
                      torch.tensor([r["rewards"] for r in records]))


# -----------------------------------------------------------------------------
# stage: align

def stage_align(cfg, env):
    enc = load_tokenizer(cfg)
    cands = None
    for method in method_list(cfg):
        settings = stage_settings(cfg, "align", method=method, align_seed=cfg.seed)
        file = path(cfg, f"policy_{method}.pt")
        if up_to_date(cfg, env, f"align-{method}", settings, [file], stage="align"):
            continue
        cands = cands or load_candidates(cfg, env, enc)
        align(cfg, env, enc, cands, method, cfg.seed, file, f"align-{method}", settings)


def align(cfg, env, enc, cands, method, seed, file, name, settings):
    """Train one policy from the SFT weights with one method on the scored candidates."""
    B, n = cands.rewards.shape
    sigma = vcb.reward_sigma(cands.rewards)
    calibrated = sigma > cfg.sigma_floor
    n_pairs = (cands.rewards[:, :, None] > cands.rewards[:, None, :]).sum((1, 2))  # ordered pairs per prompt
    if method == "vcb" and not calibrated.all():
        log(env, f"{name}: {int((~calibrated).sum())} of {B} prompts have candidates of equal reward (sigma <= "
                 f"{cfg.sigma_floor:g}) and are skipped")
    if method in PAIR_LOSSES and (n_pairs == 0).any():
        log(env, f"{name}: {int((n_pairs == 0).sum())} of {B} prompts have no strictly ordered pair and give no loss")
    torch.manual_seed(seed)
    model = load_model(path(cfg, "sft.pt"), env, enc, cfg)
    ref, rewards = cands.ref_logps.to(env.device), cands.rewards.to(env.device)

    def loss_fn(m, idx):
        x, mask = data.collate([ex for i in idx for ex in cands.examples[i]], enc.eot_token)
        x, mask = x.to(env.device), mask.to(env.device)
        logps = vcb.sequence_logps(m(x), x, mask, average=method == "rrhf").view(len(idx), n)  # (b, n)
        r, ref_b = rewards[idx], ref[idx]
        if method == "vcb":
            per_prompt, _ = vcb.vcb_prompt_losses(logps, ref_b, r, cfg.beta, cfg.lam, cfg.sigma_floor)
            loss = per_prompt.sum()
        elif method == "rrhf":
            loss = vcb.rrhf_loss(logps, r).sum()
        else:
            b, w, l = vcb.preference_pairs(r)
            loss = PAIR_LOSSES[method](logps[b, w], logps[b, l], ref_b[b, w], ref_b[b, l], cfg.beta).sum()
        return loss, align_metrics(method, logps.detach(), ref_b, r, cfg)

    def count_fn(idx):  # what the method's loss averages over
        if method == "vcb":
            return int(calibrated[idx].sum())
        return int(n_pairs[idx].sum()) if method in PAIR_LOSSES else len(idx)

    model = train(cfg, env, name, model, B, cfg.align_steps, cfg.align_batch, cfg.align_lr,
                  loss_fn, count_fn, settings, seed)
    finish(cfg, env, name, model, file, settings)
    mark_done(cfg, env, name, settings)


def align_metrics(method, logps, ref, rewards, cfg):
    """What a user watches, for every method on the same footing: over the step's ordered pairs, the
    implicit reward margin beta * h and the pair accuracy (h > 0); for VCB also the gap correlation
    and the share of skipped prompts. RRHF has no reference: its h is the gap in length-averaged logp."""
    b, w, l = vcb.preference_pairs(rewards)
    ref = torch.zeros_like(ref) if method == "rrhf" else ref
    h = vcb.margin(logps[b, w], logps[b, l], ref[b, w], ref[b, l])
    out = {"margin": (cfg.beta * h).mean().item() if len(h) else 0.0,
           "acc": (h > 0).float().mean().item() if len(h) else 0.0}
    if method == "vcb":
        diag = vcb.vcb_diagnostics(logps, ref, rewards, cfg.beta, cfg.sigma_floor)
        out.update(gap_corr=diag["gap_corr"], skipped=diag["skipped"])
    return out


# -----------------------------------------------------------------------------
# stage: eval

def stage_eval(cfg, env):
    settings = stage_settings(cfg, "eval")
    outputs = [path(cfg, "results.json"), path(cfg, "frontier.png")]
    if up_to_date(cfg, env, "eval", settings, outputs):
        return
    enc = load_tokenizer(cfg)
    policies = {"sft": path(cfg, "sft.pt"), **{m: path(cfg, f"policy_{m}.pt") for m in method_list(cfg)}}
    results = evaluate(cfg, env, enc, policies, cfg.seed)
    if env.master:
        judge = judge_name(cfg)
        rm_metrics = load_checkpoint(path(cfg, "rm.pt")).get("metrics", {})
        data.write_json(path(cfg, "results.json"), {"judge": judge, "beta": cfg.beta, "reward_model": rm_metrics,
                                                     "methods": results, "config": dataclasses.asdict(cfg)})
        table = report.results_table({m: {beta_label(m, cfg.beta): r} for m, r in results.items()}, judge)
        data.write_text(path(cfg, "results.md"), table + "\n")
        print("\n" + table + "\n")
        reward = report.reward_key(judge)
        points = [dict(method=m, kl=r["eval"]["kl"], reward=r["eval"][reward]) for m, r in results.items()]
        report.plot_frontier(points, path(cfg, "frontier.png"), f"Reward against KL (beta = {cfg.beta:g}, seed {cfg.seed})", judge)
        log(env, f"eval: wrote {path(cfg, 'results.json')}, {path(cfg, 'results.md')} and {path(cfg, 'frontier.png')}")
    barrier(env)
    mark_done(cfg, env, "eval", settings)


def judge_name(cfg):
    """Win rates are judged by the gold reward on the built-in task, by the reward model elsewhere."""
    return "gold" if cfg.data == "builtin" else "rm"


def beta_label(method, beta):
    return "-" if method in ("sft", "rrhf") or beta is None else f"{beta:g}"  # SFT and RRHF have no beta


def evaluate(cfg, env, enc, policies, seed, cache=None):
    """For each policy {name: checkpoint}, on the held-out and out-of-distribution prompts: samples
    at temperature 1 with no top-k/top-p (samples from pi itself, which the KL estimate needs),
    scored by the gold reward, the RM and both log-probs. cache {(file, seed): scored} reuses work."""
    cache = {} if cache is None else cache
    sets = {"eval": [r["prompt"] for r in load_data(cfg, "eval_prompts")],
            "ood": [r["prompt"] for r in load_data(cfg, "ood_prompts")]}
    sft = load_model(path(cfg, "sft.pt"), env, enc, cfg).eval()
    rm = load_model(path(cfg, "rm.pt"), env, enc, cfg).eval()
    scored = {}
    for name, file in policies.items():
        if (file, seed) not in cache:
            pi = sft if file == path(cfg, "sft.pt") else load_model(file, env, enc, cfg).eval()
            cache[(file, seed)] = {s: sample_and_score(cfg, env, enc, pi, sft, rm, prompts, seed, s)
                                   for s, prompts in sets.items() if prompts}
        scored[name] = cache[(file, seed)]
    judge, results = judge_name(cfg), {}
    for name, by_set in scored.items():
        results[name] = {s: report.metrics(rows, scored["sft"][s], scored["dpo"][s] if "dpo" in scored else None, judge)
                         for s, rows in by_set.items()}
        log(env, f"eval {name}: " + "; ".join(f"{s} {judge} {v[report.reward_key(judge)]:.3f} "
                                              f"rm {v['rm_reward']:.3f} kl {v['kl']:.2f}" for s, v in results[name].items()))
        if by_set.get("eval"):
            log(env, f"  e.g. {by_set['eval'][0]['prompt']!r} -> {by_set['eval'][0]['text']!r}")
    return results


@torch.no_grad()
def sample_and_score(cfg, env, enc, pi, sft, rm, prompts, seed, set_name):
    """eval_samples samples per prompt from pi, each with logp_pi, logp_sft (on the exact sampled
    tokens), its RM score and gold reward. Chunked like the sample stage, so results do not depend
    on the number of processes."""
    k, offset = cfg.eval_samples, {"eval": 0, "ood": 500_009}[set_name]  # other seeds for the other set
    rows = []
    for c, batch, ids, outs in sample_chunks(cfg, env, enc, pi, prompts, seed, offset, f"eval {set_name}",
                                             temperature=1.0, num_samples=k):
        chunk = [{"prompt_idx": c + j // k, "sample": j % k, "prompt": batch[j // k], "text": decode(enc, o)}
                 for j, o in enumerate(outs)]
        sampled = [(ids[j // k] + o, len(ids[j // k])) for j, o in enumerate(outs)]  # the exact tokens
        scores = dict(logp_pi=score_logps(cfg, env, pi, enc, sampled),
                      logp_sft=score_logps(cfg, env, sft, enc, sampled),
                      rm=score_rewards(cfg, env, rm, enc, [(r["prompt"], r["text"]) for r in chunk]))
        if cfg.data == "builtin":
            scores["gold"] = data.gold_reward([r["text"] for r in chunk])
        for j, r in enumerate(chunk):
            r.update({key: v[j] for key, v in scores.items()})
        rows += chunk
    return sorted(gather(env, rows), key=lambda r: (r["prompt_idx"], r["sample"]))


# -----------------------------------------------------------------------------
# --sweep: every method over betas and seeds

def run_sweep(cfg, env):
    """Align and evaluate every method for each beta in sweep_betas and seed in sweep_seeds, sharing
    the SFT model, the RM and the candidates (the seed changes the alignment batch order and the
    evaluation samples). RRHF has no beta and is trained once per seed."""
    enc = load_tokenizer(cfg)
    betas = [float(b) for b in cfg.sweep_betas.split(",")]
    seeds = [int(float(s)) for s in cfg.sweep_seeds.split(",")]
    methods = method_list(cfg)
    cands, cache, rows = None, {}, []
    for seed in seeds:
        runs = [(m, b) for b in betas for m in methods if m != "rrhf"] + ([("rrhf", None)] if "rrhf" in methods else [])
        files = {}
        for method, beta in runs:
            sub = dataclasses.replace(cfg, beta=beta if beta is not None else cfg.beta)
            tag = f"{method}-beta{beta:g}-seed{seed}" if beta is not None else f"{method}-seed{seed}"
            file, settings = path(cfg, "sweep", f"policy_{tag}.pt"), stage_settings(sub, "align", method=method, align_seed=seed)
            if not up_to_date(cfg, env, f"sweep-{tag}", settings, [file], stage="align"):
                cands = cands or load_candidates(cfg, env, enc)
                align(sub, env, enc, cands, method, seed, file, f"sweep-{tag}", settings)
            files[(method, beta)] = file
        for beta in betas:
            policies = {"sft": path(cfg, "sft.pt"), **{m: f for (m, b), f in files.items() if b == beta or b is None}}
            res = evaluate(cfg, env, enc, policies, seed, cache)
            for method, r in res.items():
                if method in ("sft", "rrhf"):
                    if beta != betas[0]:
                        continue  # beta-free: counted once per seed, and not compared with DPO at one beta
                    r = {s: {**m, "win_rate_vs_dpo": None} for s, m in r.items()}
                rows.append({"method": method, "beta": None if method in ("sft", "rrhf") else beta, "seed": seed, **r})
    if env.master:
        judge, summary = judge_name(cfg), report.summarise(rows)
        data.write_json(path(cfg, "sweep", "results.json"), {"judge": judge, "betas": betas, "seeds": seeds,
                                                              "runs": rows, "summary": summary})
        table = report.results_table({m: {beta_label(m, b): r for b, r in by_beta.items()}
                                      for m, by_beta in summary.items()}, judge)
        data.write_text(path(cfg, "sweep", "results.md"), table + "\n")
        print(f"\nSweep over beta in {betas}, seeds {seeds} (mean ± std over seeds; win vs DPO at the same beta):\n\n{table}\n")
        reward = report.reward_key(judge)
        points = [dict(method=m, beta=b, kl=r["eval"]["kl"][0], kl_std=r["eval"]["kl"][1], reward=r["eval"][reward][0],
                       reward_std=r["eval"][reward][1]) for m, by_beta in summary.items() for b, r in by_beta.items()]
        report.plot_frontier(points, path(cfg, "sweep", "frontier.png"),
                             f"Reward against KL over beta, mean ± std over {len(seeds)} seeds", judge)
        log(env, f"sweep: wrote {path(cfg, 'sweep', 'results.json')}, results.md and frontier.png")


# -----------------------------------------------------------------------------

STAGE_FNS = {"data": stage_data, "sft": stage_sft, "rm": stage_rm, "sample": stage_sample,
             "align": stage_align, "eval": stage_eval}


def main(argv):
    cfg = parse_args(argv)
    env = setup(cfg)
    t0 = time.time()
    if env.master:
        print("config: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
        data.write_json(path(cfg, "config.json"), dataclasses.asdict(cfg))
        print(f"device: {env.device} ({str(env.dtype).removeprefix('torch.')}), processes: {env.world}")
    for stage in STAGES if cfg.stage == "all" else [cfg.stage]:
        STAGE_FNS[stage](cfg, env)
    if cfg.sweep:
        run_sweep(cfg, env)
    log(env, f"done in {time.time() - t0:.0f}s")
    if env.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
