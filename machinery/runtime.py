"""
machinery/runtime.py: what a run stands on besides the models and the losses: the devices, processes
and precision it runs with, the model as training runs it (torch.compile, DDP), the checkpoints of
trained models, the batch order and learning-rate schedule that make an interrupted run resume
exactly, and the one-line errors a program ends with.

Nothing here knows the stages: train.py, ppo.py, evaluate.py and the experiments build on it.
"""
import dataclasses
import math
import os
import pickle
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from machinery import processes
from machinery.config import RANGES, ConfigError, as_dict, check_launch, parse_args
from machinery.files import REFUSALS, DataError, atomic_path, field, make_folder, one_line, refusal, write_json
from model import GPT, GPTConfig


class TrainingError(RuntimeError):
    """Training had to stop (a non-finite loss, broken weights), with a one-line message. The three
    errors a program ends with: ConfigError (an option), DataError (a file), TrainingError (a run)."""
    def __init__(self, message):
        super().__init__(one_line(message))


running = ""  # the task under way, for the message when the run is interrupted


def note_progress(text):
    global running
    running = text


def command(main):
    """Run main(sys.argv[1:]) as a program: a known error is one line on stderr and exit status 2."""
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, torch.OutOfMemoryError) as e:  # sizes the options allow but this machine does not hold
        during = f" during {running}" if running else ""
        print(f"error: out of memory{during} ({str(e).splitlines()[0][:120] if str(e) else 'MemoryError'}): lower the batch "
              f"sizes (--eval_batch, --sample_batch, ...), raise --grad_accum, or use a smaller model", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        during = f" during {running}" if running else ""
        print(f"\ninterrupted{during}: finished stages are kept, and training resumes from its last checkpoint "
              f"(every --ckpt_interval steps): run the same command again to go on", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # the file system's refusal where no writer named the path (files.writing names it where one did)
        if e.errno not in REFUSALS:
            raise
        print(f"error: {refusal(e.filename or 'a file of the run', e, 'use')}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# devices, processes, precision

@dataclass
class Env:
    device: str          # where the models live
    device_type: str     # cuda or cpu (for autocast and the fused optimizer)
    dtype: torch.dtype   # autocast dtype; float32 means no autocast
    rank: int            # this process in a torchrun group (0 alone)
    world: int           # processes in the group (1 alone)
    bars: bool = True    # progress bars (off in the experiments' worker processes: their bars would mix)

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


def start(argv, doc="", check=None):
    """Options, devices and processes of a run, every check of the options before anything runs
    (check(cfg): the caller's own); prints and saves the config. With --plan, the checks alone:
    returns (cfg, None) and starts, creates and writes nothing. Otherwise the run holds its --out_dir
    from here until processes.release(cfg.out_dir) (train.main) or its end: a second run into the same
    folder is refused at once (machinery/processes.py)."""
    cfg = parse_args(argv, doc)
    check_launch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if check is not None:
        check(cfg)
    if cfg.plan:
        return cfg, None
    make_folder(cfg.out_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # the other processes of a torchrun group are this run's own
        holder = processes.claim(cfg.out_dir)
        if holder is not None:
            raise ConfigError(f"--out_dir={cfg.out_dir} is in use by another run ({holder}): wait for it to end, or use "
                              f"another --out_dir")
    try:
        env = setup(cfg)
        if env.master:
            print("config: " + ", ".join(f"{k}={v}" for k, v in as_dict(cfg).items()))
            write_json(path(cfg, "config.json"), as_dict(cfg))
            print(f"device: {env.device} ({str(env.dtype).removeprefix('torch.')}), processes: {env.world}")
    except BaseException:
        processes.release(cfg.out_dir)
        raise
    return cfg, env


COMPILE = dict(dynamic=True)  # torch.compile's options (the tests count compilations with a backend of their own)


def wrap(cfg, env, module):
    """A module as training runs it: with --compile=true, torch.compile'd with dynamic shapes (the
    batches' changing lengths share one graph per head instead of one per shape; modules of the same
    class share the compiled code, so every task of a process reuses it); under torchrun, in DDP,
    which averages the gradients over the processes. Checkpoints are saved from the model itself."""
    runner = torch.compile(module, **COMPILE) if cfg.compile else module
    if env.world > 1:
        runner = DDP(runner, device_ids=[env.device] if env.device_type == "cuda" else None)
    return runner


def no_sync(runner, env, last):
    """DDP's gradient all-reduce only after the last micro-batch of a step (the others accumulate)."""
    return runner.no_sync() if env.world > 1 and not last else nullcontext()


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


def all_reduce(env, tensor):
    if env.world > 1:
        dist.all_reduce(tensor)


def barrier(env):
    if env.world > 1:
        dist.barrier()


def close(env):
    if env.world > 1:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# batch order and learning rate: functions of the step alone, so a resumed run is exact

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


def micro_batches(indices, env, grad_accum):
    """This process's share of a step's examples (every world-th one), split into grad_accum micro-batches."""
    mine = indices[env.rank::env.world]
    return [mine[k::grad_accum] for k in range(grad_accum)]


def lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# -----------------------------------------------------------------------------
# checkpoints of trained models

def path(cfg, *parts):
    return os.path.join(cfg.out_dir, *parts)


def save_checkpoint(file, payload):
    """torch.save through a Python file object: given a path, torch writes in C++ and a full disk
    comes back as "[enforce fail at inline_container.cc] unexpected pos"; through a file object it is
    the OSError itself, which files.writing turns into one line naming the file."""
    with atomic_path(file) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(file):
    """torch.load with weights_only=True: tensors and plain values only; a pickle could run code."""
    if not os.path.exists(file):
        raise DataError(f"{file}: no such checkpoint (run the stage that writes it first)")
    try:
        ck = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()[0][:160]
        raise DataError(f"{file}: refused: it holds pickled Python objects, which could run code ({detail})") from None
    except Exception as e:
        raise DataError(f"{file}: not a readable checkpoint ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(ck, dict):
        raise DataError(f"{file}: holds a {type(ck).__name__}, not a checkpoint of this project (a dict of its parts)")
    return ck


def checkpoint_model(file, ck, **overrides):
    """The GPT a checkpoint of ours describes, with its weights loaded: every part read through
    files.field, the shape within its options' ranges (config.RANGES) and the weights finite
    floating-point tensors that fit it; anything else is a one-line DataError naming the field.
    overrides: GPTConfig fields (dropout, reward_head)."""
    shape = {k: field(ck, f"model_args.{k}", int, file, lo=RANGES[k].lo, hi=RANGES[k].hi)
             for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size")}
    flags = {k: field(ck, f"model_args.{k}", bool, file) for k in ("bias", "reward_head")}
    if shape["n_embd"] % shape["n_head"]:
        raise DataError(f"{file}: field 'model_args.n_embd' ({shape['n_embd']}) is not a multiple of n_head ({shape['n_head']})")
    weights = field(ck, "model", dict, file)
    for k, v in weights.items():
        if not (torch.is_tensor(v) and v.is_floating_point()):
            raise DataError(f"{file}: field 'model.{k}' should be a floating-point tensor, got "
                            f"{v.dtype if torch.is_tensor(v) else type(v).__name__}")
        if not v.isfinite().all():
            raise DataError(f"{file}: field 'model.{k}' holds non-finite weights (training diverged): redo the stage that wrote it")
    config = GPTConfig(**{**shape, **flags, **overrides})
    with torch.device("meta"):  # the shapes it needs, with no memory: a checkpoint may describe a huge model
        expected = GPT(config).state_dict()
    new_head = overrides.get("reward_head") and not flags["reward_head"]
    missing = [k for k in expected if k not in weights and not (new_head and k.startswith("reward_head."))]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in weights if k in expected and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise DataError(f"{file}: weights do not fit the model it describes: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, other shape {[f'{k} {tuple(weights[k].shape)}' for k in wrong[:3]]}")
    model = GPT(config)
    model.load_state_dict(weights, strict=False)
    loaded = model.state_dict()  # tied weights (the embedding and lm_head) are one tensor: the last one read wins
    for k, v in weights.items():
        if not torch.equal(loaded[k], v.to(loaded[k].dtype)):
            raise DataError(f"{file}: field 'model.{k}' differs from the weight the model ties it to")
    return model


def save_model(cfg, env, file, model, enc, **extra):
    """A trained model, with its shape, the fingerprint of its tokenizer and the run's config."""
    if env.master:
        save_checkpoint(file, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                               "tokenizer": data.fingerprint(enc), "config": as_dict(cfg), **extra})


def model_args(cfg, vocab_size):
    return dict(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_embd=cfg.n_embd, dropout=cfg.dropout, bias=True, reward_head=False)


def load_model(file, env, enc, cfg, reward_head=None, dropout=0.0):
    """A GPT from one of our checkpoints, checked against the tokenizer and this run's model
    settings. reward_head=True on an SFT checkpoint starts a reward model: SFT's weights, a new head.
    dropout: 0 for scoring and alignment (dropout would make log pi(y|x) noisy)."""
    ck = load_checkpoint(file)
    args = {k: field(ck, f"model_args.{k}", int, file) for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size")}
    if args["vocab_size"] != enc.n_vocab:  # this run's checks first: a checkpoint of another run is refused unbuilt
        raise DataError(f"{file}: vocab_size is {args['vocab_size']} in the checkpoint but the tokenizer has "
                        f"{enc.n_vocab} tokens: it was made with another tokenizer")
    for key in ("n_layer", "n_head", "n_embd", "block_size") if cfg.init_from == "scratch" else ("block_size",):
        if args[key] != getattr(cfg, key):
            raise DataError(f"{file}: {key} is {args[key]} in the checkpoint but --{key}={getattr(cfg, key)} in this "
                            f"run: redo the stage that wrote it with these settings, or use another --out_dir")
    if field(ck, "tokenizer", str, file) != data.fingerprint(enc):
        raise DataError(f"{file}: made with another tokenizer than {path(cfg, 'tokenizer.json')} (same size, other "
                        f"tokens): redo the stage that wrote it, or use the tokenizer it was made with")
    model = checkpoint_model(file, ck, dropout=dropout, reward_head=bool(reward_head or field(ck, "model_args.reward_head", bool, file)))
    return model.to(env.device)
