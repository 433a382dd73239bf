"""
runtime.py: what a run stands on besides the models and the losses: the devices, processes and
precision it runs with; the checkpoints (models, and the resumable progress of a training) and the
data files the stages hand each other; the batch order and learning-rate schedule that make an
interrupted run resume exactly; and the one-line errors a program ends with.

Nothing here knows the stages; train.py, experiments.py and sample.py build on it (records.py keeps
the record of what is done).
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
from tqdm import tqdm

import data
import packing
import vcb
from config import RANGES, ConfigError, parse_args
from data import DataError, field
from model import GPT, GPTConfig


class TrainingError(RuntimeError):
    """Training had to stop (a non-finite loss, broken weights), with a one-line message. The three
    errors a program ends with: ConfigError (an option), DataError (a file), TrainingError (a run)."""
    def __init__(self, message):
        super().__init__(data.one_line(message))


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


# -----------------------------------------------------------------------------
# devices, processes, precision

@dataclass
class Env:
    device: str          # where the models live
    device_type: str     # cuda or cpu (for autocast and the fused optimizer)
    dtype: torch.dtype   # autocast dtype; float32 means no autocast
    rank: int            # this process in a torchrun group (0 alone)
    world: int           # processes in the group (1 alone)
    bars: bool = True    # progress bars (off in experiments.py's worker processes: their bars would mix)

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


def start(argv, doc=""):
    """Options, devices and processes of a run; prints and saves the config."""
    cfg = parse_args(argv, doc)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out_dir={cfg.out_dir}: cannot create it ({e.strerror})") from None
    env = setup(cfg)
    if env.master:
        print("config: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
        data.write_json(path(cfg, "config.json"), dataclasses.asdict(cfg))
        print(f"device: {env.device} ({str(env.dtype).removeprefix('torch.')}), processes: {env.world}")
    return cfg, env


COMPILE = dict(dynamic=True)  # torch.compile's options (the tests count compilations with a backend of their own)


def compiled(cfg, model):
    """The model as training runs it: with --compile=true, torch.compile'd with dynamic shapes, so that
    the batches' changing lengths share one graph per way of reading (ids or packed, and the head)
    instead of one per shape. Modules of the same class share the compiled code, so every task of a
    process (SFT, the reward model, each policy) reuses it. Checkpoints are saved from the module itself."""
    return torch.compile(model, **COMPILE) if cfg.compile else model


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


def lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# -----------------------------------------------------------------------------
# checkpoints

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
    data.field, the shape within its options' ranges (config.RANGES) and the weights finite
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


def finite_weights(model):
    return all(p.isfinite().all() for p in model.parameters())


def save_model(cfg, env, file, model, enc, **extra):
    """A trained model, with its shape, the fingerprint of its tokenizer and the run's config."""
    if env.master:
        save_checkpoint(file, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                               "tokenizer": data.fingerprint(enc), "config": dataclasses.asdict(cfg), **extra})


def save_snapshot(cfg, env, task, step, model, enc):
    if step in task.snapshots:
        save_model(cfg, env, task.snapshots[step], model, enc, step=step)


def progress_file(cfg, task):
    return path(cfg, f"{task.name}.ckpt.pt")


def save_progress(cfg, env, task, step, state, **extra):
    """A resumable checkpoint: state {name: model or optimizer}, the step, the random state, the task's
    settings and extra values, in <task>.ckpt.pt."""
    if env.master:
        ck = {k: v.state_dict() for k, v in state.items()}
        ck.update(step=step, settings=task.settings, rng=torch.get_rng_state(), extra=extra)
        if env.device_type == "cuda":
            ck["cuda_rng"] = torch.cuda.get_rng_state(env.device)
        save_checkpoint(progress_file(cfg, task), ck)


def resume(cfg, env, task, state):
    """Load state {name: model or optimizer} from the task's resumable checkpoint when it was made with
    the task's settings. Returns (the step to continue from, the extra values): (0, {}) afresh."""
    file = progress_file(cfg, task)
    if not os.path.exists(file):
        return 0, {}
    ck = load_checkpoint(file)
    if ck.get("settings") != task.settings:
        log(env, f"{task.name}: {file} was made with other settings; starting over")
        return 0, {}
    step, extra = field(ck, "step", int, file, lo=0), field(ck, "extra", dict, file) if "extra" in ck else {}
    try:  # what torch checks of a state dict (keys, shapes, an optimizer's groups) is all there is to check
        for k, v in state.items():
            v.load_state_dict(field(ck, k, dict, file))
        torch.set_rng_state(ck["rng"])
        if env.device_type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"], env.device)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DataError(f"{file}: not a resumable checkpoint of {task.name} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        f"delete it to start the task over") from None
    log(env, f"{task.name}: resuming from {file} at step {step}")
    return step, extra


def check_healthy(cfg, env, task, models, probe, step, last_good):
    """Stop with a TrainingError unless the models' weights are finite and probe() (a loss on a few
    examples) is finite too: weights can stay finite and still be so large that every output
    overflows (one step at --align_lr=1e30), which only a forward pass shows. step None: the end."""
    ok = all(finite_weights(m) for m in models)
    if ok:
        with torch.no_grad(), env.autocast():
            ok = bool(torch.isfinite(probe()))
    if env.world > 1:  # every process must agree, or the ones that stop leave the others waiting
        flag = torch.tensor(float(ok), device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok:
        when = "the last step" if step is None else f"step {step}"
        raise TrainingError(f"{task.name}: the model is broken after {when} (non-finite weights or loss; learning rate "
                            f"too high?); {'nothing was saved as finished, and ' if step is None else 'stopped, and '}"
                            f"{kept_checkpoint(cfg, task, last_good)}")


def kept_checkpoint(cfg, task, step):
    return f"the last good checkpoint, {progress_file(cfg, task)} (step {step}), is kept" if step else \
        "no checkpoint was written yet"


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


# -----------------------------------------------------------------------------
# progress, for the message when a run is interrupted

running = ""  # the task under way, for the message when the run is interrupted


def note_progress(text):
    global running
    running = text


# -----------------------------------------------------------------------------
# the files the stages hand each other

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


def encode_groups(cfg, env, enc, prompts, responses, what):
    """Each prompt with its responses (one demonstration, or a chosen and a rejected one) as token ids
    for packing.pack, logging how many sequences will be cut to fit block_size."""
    groups = [packing.encode_group(enc, p, rs) for p, rs in zip(prompts, responses)]
    log_cut(cfg, env, what, sum(packing.fit(p, rs, cfg.block_size)[2] for p, rs in groups), sum(len(rs) for rs in responses))
    return groups


@dataclass
class Candidates:
    """The scored candidates, ready for alignment: groups[i] is prompt i with its n candidates as
    token ids (packing.encode_group, what packing.pack reads); ref_logps and rewards are (B, n) float32."""
    groups: list
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
    ref_logps, rewards = torch.tensor([r["ref_logps"] for r in records]), torch.tensor([r["rewards"] for r in records])
    for key, values in (("ref_logps", ref_logps), ("rewards", rewards), ("rewards", vcb.reward_sigma(rewards)[:, None])):
        bad = (~values.isfinite()).any(-1).nonzero()
        if len(bad):  # finite in JSON's float64, but not in float32 (or their spread is not)
            raise DataError(f"{file}:{int(bad[0]) + 1}: field '{key}' has values too large for float32 (|value| < 1e38)")
    groups = [packing.encode_group(enc, r["prompt"], r["responses"]) for r in records]
    log_cut(cfg, env, "candidates", sum(packing.fit(p, rs, cfg.block_size)[2] for p, rs in groups), n * len(groups))
    return Candidates(groups, ref_logps, rewards)


def log_cut(cfg, env, what, cut, total):
    if cut:
        log(env, f"{what}: {cut} of {total} sequences were longer than block_size={cfg.block_size}; "
                 f"prompts were cut from the left (responses from the right where they alone did not fit)")
