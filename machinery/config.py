"""
machinery/config.py: the run's configuration. Every option of train.py and the experiments is a
field of `Config` with its default and a comment saying what it does; `--key=value` on the command
line overrides it, converted to the field's type and checked before anything runs.

    python train.py --help       # every option, with its default and the comment below

Config also notes which options are read while a task runs (reading()): machinery/records.py keeps
them as the settings that task's outputs depend on, so what makes a stage stale is derived from what
it reads, never listed by hand.
"""
import contextlib
import dataclasses
import difflib
import inspect
import os
import re
import sys
from dataclasses import dataclass

import vcb
from machinery.files import DataError, one_line, read_json, shown, valid_unicode
from model import GPTConfig


STAGES = ["data", "sft", "rm", "sample", "align", "eval"]
METHODS = list(vcb.METHODS)  # the methods' names, in the order of vcb.METHODS (tables, figures, --methods)


@dataclass
class Config:
    # ---- run
    preset: str = ""                 # a JSON file of options (presets/gpt2-hh.json); --key=value here overrides them
    out_dir: str = "out"             # every file of the run goes here
    stage: str = "all"               # data, sft, rm, sample, align, eval, or all (in that order)
    force: bool = False              # redo the chosen stages even when their outputs are up to date
    plan: bool = False               # check every option and file the run needs, print its stages with estimates, and stop
    sweep_seeds: str = "0,1,2,3,4"   # the experiments' seeds, each a whole pipeline: data, SFT, RM, candidates, policies, evaluation
    sweep_lrs: str = "0.3,1"         # the experiments' learning rates, as multiples of each training's own (--align_lr, --online_lr)
    sweep_kls: str = "1,2,4,8"       # the KL budgets (nats) at which the experiments read each method
    snapshots: int = 6               # the experiments: policies kept along each training, closer early (the last is the final one)
    quick: bool = False              # the experiments: 2 seeds, one beta per method, the usual learning rate: a look in minutes
    steps_factor: int = 4            # python -m experiments steps: train this many times the usual steps
    seed: int = 0                    # seed of the data, initialisation, batch order and sampling
    device: str = "auto"             # auto (cuda when there is one, else cpu), cpu, cuda, cuda:1, ...
    dtype: str = "auto"              # auto (bfloat16 autocast on CUDA, float32 on CPU), float32, bfloat16, float16
    compile: bool = False            # torch.compile the model for training (CUDA; slow first steps)
    jobs: int = 0                    # the experiments: trainings at once in worker processes (0: auto, the CPU cores on CPU, 1 on GPU)
    # ---- data
    data: str = "builtin"            # builtin (reviews with a gold reward), hh, tldr, or jsonl (your own files)
    data_dir: str = ""               # folder of the hh, tldr or jsonl files (docs/data.md)
    tokenizer: str = "bpe"           # bpe: trained here on the SFT text; gpt2: GPT-2's, from its vocab.bpe and encoder.json
    tokenizer_dir: str = ""          # gpt2: the folder of vocab.bpe and encoder.json ("": beside --init_from's weights, else gpt2)
    vocab_size: int = GPTConfig.vocab_size  # bpe: vocabulary size, <|endoftext|> included
    n_sft: int = 4000                # SFT demonstrations (hh, tldr, jsonl: at most this many, 0 for all)
    n_prefs: int = 3000              # preference pairs for the reward model (likewise)
    n_align: int = 320               # prompts that get n_candidates scored candidates each (likewise)
    n_eval: int = 128                # held-out prompts, and as many out-of-distribution ones (likewise)
    pref_tau: float = 0.25           # builtin: Bradley-Terry temperature of the labels on the gold reward
    stakes: bool = False             # builtin: every other film's and restaurant's gold reward (so labels too) x0.1
    # ---- model
    init_from: str = "scratch"       # scratch, or the path of a GPT-2 model.safetensors (needs --tokenizer=gpt2)
    n_layer: int = GPTConfig.n_layer  # transformer blocks
    n_head: int = GPTConfig.n_head   # attention heads
    n_embd: int = GPTConfig.n_embd   # residual width
    block_size: int = GPTConfig.block_size  # longest prompt + response, in tokens
    dropout: float = GPTConfig.dropout  # dropout in SFT and RM training (alignment always runs without)
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
    n_candidates: int = 8            # candidates per prompt (n in docs/method.md)
    max_new_tokens: int = 48         # longest response
    temperature: float = 1.0         # sampling temperature of the candidates
    top_k: int = 0                   # top-k of the candidates (0: off)
    top_p: float = 1.0               # top-p of the candidates (1: off)
    sample_batch: int = 64           # prompts per generate() call; each call has its own seed
    # ---- align
    methods: str = "vcb,dpo,ipo,slic,rrhf,ppo,rloo"  # comma-separated, from vcb, dpo, ipo, slic, rrhf, ppo, rloo, rebel, infonca, odpo
    beta: float = 1.0                # KL strength beta of every method (VCB: the reward gap / (beta sigma))
    lam: float = 0.1                 # VCB: LogSumExp temperature over a prompt's pairs (0: plain mean)
    sigma_floor: float = vcb.SIGMA_FLOOR  # VCB: prompts whose reward spread is at or under this are skipped
    vcb_sigma: str = "prompt"        # VCB: sigma(x) per prompt (the paper's), or global: one for the whole candidate set
    layout: str = "packed"           # how a batch of prompts with responses is read: packed (prefix-shared, faster) or padded (plain rows)
    align_steps: int = 60            # optimizer steps per method
    align_batch: int = 8             # prompts per step, each with all its candidates
    align_lr: float = 1e-3           # peak learning rate
    # ---- online methods: ppo and rloo (ppo.py)
    online_iters: int = 30           # iterations: a batch of rollouts, then the updates on it
    online_prompts: int = 16         # prompts per iteration
    online_k: int = 4                # samples per prompt: RLOO's k, and PPO's (both learn from the same rollouts)
    online_lr: float = 3e-4          # peak learning rate of the policy
    critic_lr: float = 1e-3          # PPO: peak learning rate of the critic
    ppo_epochs: int = 4              # PPO: passes over each batch of rollouts
    ppo_minibatches: int = 2         # PPO: gradient steps per pass
    ppo_clip: float = 0.2            # PPO: clip range of the probability ratio and of the value
    ppo_vf_coef: float = 0.1         # PPO: weight of the value loss
    ppo_gamma: float = 1.0           # PPO: GAE discount
    ppo_lambda: float = 0.95         # PPO: GAE lambda
    ppo_target_kl: float = 0.0       # PPO and RLOO: adapt beta towards this KL in nats (0: beta stays fixed)
    ppo_kl_horizon: int = 10000      # PPO and RLOO: the controller's horizon in rollouts (smaller: beta moves faster)
    eos_penalty: float = 1.0         # subtracted from the normalised score of a response cut at max_new_tokens
    # ---- eval
    eval_samples: int = 2            # samples per prompt and policy, at temperature 1 with no top-k/top-p
    val_samples: int = 1             # the same on the validation prompts, where the experiments choose each method's settings
    eval_batch: int = 256            # sequences per forward pass when scoring
    # ---- logging and checkpoints
    log_interval: int = 20           # steps between printed log lines
    ckpt_interval: int = 50          # steps between resumable checkpoints

    def __getattribute__(self, name):  # an option read while a task runs is one its outputs depend on
        if _reading and name in FIELDS:
            for reads in _reading:
                reads.add(name)
        return object.__getattribute__(self, name)


FIELDS = frozenset(f.name for f in dataclasses.fields(Config))
# Options a task reads that change none of its outputs: where files go, how often it logs and
# checkpoints (a resumed run ends bit-identical), whether to redo it, how many worker processes run
# the experiments. tests/test_records.py runs the pipeline with each of them changed and checks that
# every output is the same.
NEUTRAL = frozenset({"out_dir", "log_interval", "ckpt_interval", "force", "stage", "preset", "jobs"})
_reading = []  # the sets collecting what the tasks under way read (innermost last): reading()


@contextlib.contextmanager
def reading():
    """Yields the set of options (besides NEUTRAL) that Config instances are read for inside the block."""
    reads = set()
    _reading.append(reads)
    try:
        yield reads
    finally:
        _reading.remove(reads)
        reads -= NEUTRAL


def note_reads(names):
    """Count these options as read by the tasks under way (what a kept result was computed from)."""
    for reads in _reading:
        reads.update(names)


def peek(cfg, name):
    """An option's value, not counted as read."""
    return object.__getattribute__(cfg, name)


def as_dict(cfg):
    """Every option, not counted as read (each checkpoint and the run's config.json keep them all)."""
    return {f.name: peek(cfg, f.name) for f in dataclasses.fields(Config)}


# The range of every number option: what the computation holds, checked by parse_options for every
# command. A seed goes to torch's generators times about 1e6, so it is a 32-bit number; counts and
# sizes stay within int32, what some CUDA kernels index with; a beta, a temperature or a lam divides
# or scales float32 values, so 1e-6 to 1e6 keeps every exp and square finite (tests/test_fuzz_options.py
# checks the losses at both ends). `zero`: what 0 means where it is allowed below lo. Every command's
# number options are here, one name for one thing.
@dataclass(frozen=True)
class Range:
    lo: float       # the smallest value (besides 0, where zero says what it means)
    hi: float       # the largest value
    zero: str = ""  # "off", "all", ...: 0 is allowed and means this
    why: str = ""   # said with the error, where the range is not obvious

    def error(self, key, value):
        show = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731  (ints in full)
        return (f"--{key}={value}: must be {'0 (' + self.zero + ') or ' if self.zero else ''}a number from {show(self.lo)} "
                f"to {show(self.hi)}" + (f" ({self.why})" if self.why else ""))


COUNT = 2**31 - 1   # the most of anything: steps, examples, tokens
SCALE = 1e6         # the largest (and 1/SCALE the smallest) multiplier of float32 values
RANGES = {
    "seed": Range(0, 2**32 - 1, why="a 32-bit seed"), "steps_factor": Range(1, 1000), "jobs": Range(1, 1024, "auto"),
    "snapshots": Range(1, 1000), "val_samples": Range(1, 1024), "lr_factor": Range(1e-3, 1e3), "kl_budget": Range(1e-3, 1e4),
    "vocab_size": Range(257, 2**20, why="256 bytes and <|endoftext|> at least"),
    **{k: Range(1, 10**8, "all (hh, tldr and jsonl)") for k in ("n_sft", "n_prefs", "n_align", "n_eval")},
    "pref_tau": Range(1 / SCALE, SCALE),
    "n_layer": Range(1, 1024), "n_head": Range(1, 1024), "n_embd": Range(1, 2**16), "block_size": Range(2, 2**20),
    "dropout": Range(0, 0.99), "weight_decay": Range(0, 1e3), "grad_clip": Range(1 / SCALE, SCALE, "off"),
    "warmup_steps": Range(0, COUNT), "grad_accum": Range(1, COUNT),
    **{k: Range(1, COUNT) for k in ("sft_steps", "sft_batch", "rm_steps", "rm_batch", "align_steps", "align_batch",
                                     "sample_batch", "online_iters", "online_prompts", "ppo_minibatches",
                                     "ppo_kl_horizon", "eval_batch", "log_interval", "ckpt_interval", "max_new_tokens")},
    # a learning rate large enough to blow the weights up is caught by the health check (runtime.check_healthy)
    **{k: Range(1e-12, 1e30) for k in ("sft_lr", "rm_lr", "align_lr", "online_lr", "critic_lr")},
    "rm_holdout": Range(0, 0.9), "n_candidates": Range(2, 1024, why="VCB and the baselines compare candidates"), "temperature": Range(1 / SCALE, SCALE),
    "top_k": Range(1, COUNT, "off"), "top_p": Range(1 / SCALE, 1),
    "beta": Range(1 / SCALE, SCALE), "lam": Range(1 / SCALE, SCALE, "a plain mean"), "sigma_floor": Range(0, SCALE),
    "online_k": Range(1, 1024), "ppo_epochs": Range(1, 1000), "ppo_clip": Range(1 / SCALE, 0.99),
    "ppo_vf_coef": Range(1 / SCALE, SCALE), "ppo_gamma": Range(0, 1), "ppo_lambda": Range(0, 1),
    "ppo_target_kl": Range(1 / SCALE, SCALE, "off"), "eos_penalty": Range(0, SCALE), "eval_samples": Range(1, 1024),
    # the other commands' own: sample.py, bench.py, gpu_check.py, rehearse.py, prepare.py, crashtest.py
    "num_samples": Range(1, 1024), "new_tokens": Range(1, COUNT), "limit": Range(1, 7 * 24 * 3600), "steps": Range(1, COUNT),
    "timeout": Range(0.1, 3600),  # prepare.py: seconds to wait for a server
    "chains": Range(1, 1000),
}


# What every option that names a choice or lists values may hold: a check of the value alone that
# returns what is wrong with it (or None), run by check_ranges with the ranges above, so that a value
# from a preset or a run's config.json is refused naming its file. Checks of options together are in
# validate.
def one_of(*allowed):
    return lambda v: None if v in allowed else f"expected one of {', '.join(allowed)}"


def method_names(raw):
    names = [m.strip() for m in raw.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    twice = [m for m in METHODS if names.count(m) > 1]
    if unknown:
        return f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}"
    if not names:
        return "no method: name at least one of " + ", ".join(METHODS)
    if twice:
        return f"{twice[0]} is named twice (each method trains one policy file)"


def number_list(kind, like):
    """The check of a comma-separated list of numbers, each a `kind` within the range of option `like`,
    none twice (the same policy would be trained twice, into one file)."""
    def check(raw):
        try:
            values = [kind(v) for v in raw.split(",")]
        except ValueError:
            return f"expected comma-separated {'numbers' if kind is float else 'whole numbers'}"
        r = RANGES[like]
        for v in values:
            if not r.lo <= v <= r.hi:
                return f"{v} is not " + r.error(like, v).split(": must be ", 1)[1].removeprefix("a number ")
            if values.count(v) > 1:
                return f"{v:g} appears twice"
    return check


RANGES.update({
    "stage": one_of(*STAGES, "all"), "data": one_of("builtin", "hh", "tldr", "jsonl"), "tokenizer": one_of("bpe", "gpt2"),
    "dtype": one_of("auto", "float32", "bfloat16", "float16"), "vcb_sigma": one_of("prompt", "global"),
    "layout": one_of("packed", "padded"),
    "device": lambda v: None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else
    "expected auto, cpu, cuda or cuda:N (other devices are not supported)",
    "methods": method_names, "sweep_lrs": number_list(float, "lr_factor"), "sweep_kls": number_list(float, "kl_budget"),
    "sweep_seeds": number_list(int, "seed"),
    "mirror": lambda v: None if v == "" or re.fullmatch(r"https?://[^\s/]+(/\S*)?", v) else
    "expected the address of a server, http://HOST[:PORT][/PATH] or https://...",
})


class ConfigError(ValueError):
    """A bad command-line option, with a one-line message."""
    def __init__(self, message):
        super().__init__(one_line(message))


def parse_args(argv, doc=""):
    """train.py's and experiments.py's options: Config with --key=value applied, validated."""
    cfg = parse_options(Config(), argv, doc)
    try:
        validate(cfg)
    except ConfigError as e:  # options wrong together: name the preset where it set one of them
        if cfg.preset and any(f"--{k}=" in str(e) for k in read_options(cfg.preset)):
            raise ConfigError(f"{cfg.preset}: {e}") from None
        raise
    return cfg


def parse_options(cfg, argv, doc="", ranges=RANGES):
    """--key=value options onto the dataclass instance cfg, each converted to its field's type; a bare
    --flag sets a bool. doc: the calling program's docstring, printed above the options by --help.
    For Config, a --preset=FILE applies the file's options first, whatever its place. Every value
    is then checked against its range (check_ranges)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    presets = [a.split("=", 1)[1] for a in argv if a.startswith("--preset=")] if isinstance(cfg, Config) else []
    for file in presets[-1:]:
        apply_options(cfg, read_options(file, "--preset"), file, exclude=("preset",))
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage(doc, type(cfg)))
            sys.exit(0)
        m = re.fullmatch(r"--([A-Za-z_0-9]+)(?:=(.*))?", arg, re.S)
        if not m:
            raise ConfigError(f"cannot read {arg!r}: options look like --key=value (--help lists them)")
        key, raw = m.groups()
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"unknown option --{key}" + (f"; did you mean --{near[0]}?" if near else " (--help lists them)"))
        kind = type(getattr(type(cfg), key))
        if raw is None and kind is not bool:
            raise ConfigError(f"--{key} needs a value: --{key}=<{kind.__name__}>")
        setattr(cfg, key, convert(key, "true" if raw is None else raw, kind))
    check_ranges(cfg, ranges)
    return cfg


def check_ranges(opts, ranges=RANGES):
    """Every option of a dataclass instance, each alone, within what the computation holds: a number
    within its Range (a NaN is within none), a string that is text a file or a path can hold (no NUL,
    no lone surrogate from undecodable command-line bytes) and, where ranges has a check for it, one
    of its choices."""
    for f in dataclasses.fields(opts):
        v, kind = getattr(opts, f.name), type(getattr(type(opts), f.name))
        if kind in (int, float):
            r = ranges[f.name]  # a KeyError here is a bug: every number option has a range
            if not (r.lo <= v <= r.hi or (r.zero and v == 0)):
                raise ConfigError(r.error(f.name, v))
        elif kind is str:
            if "\0" in v or not valid_unicode(v):
                raise ConfigError(f"--{f.name}={v!a}: not text (a NUL character, or bytes that are not UTF-8)")
            wrong = ranges[f.name](v) if ranges.get(f.name) else None
            if wrong:
                raise ConfigError(f"--{f.name}={v}: {wrong}")


def read_options(file, option=""):
    """A JSON object of options (a preset, a run's config.json), read as files.read_json reads a file;
    option: the command-line option that named the file, to begin the error with."""
    try:
        return read_json(file)
    except DataError as e:
        raise ConfigError(f"{option}={e}" if option else str(e)) from None


def apply_options(cfg, options, file, exclude=(), unknown="error"):
    """The options of a JSON object {key: value} onto cfg, each converted and checked as if given as
    --key=value, errors naming the file. unknown="skip": keys cfg does not have are left out (a
    run's config.json from an older version of this file)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key, value in options.items():
        if key not in fields or key in exclude:
            if unknown == "skip":
                continue
            near = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"{file}: unknown option '{key}'" + (f"; did you mean '{near[0]}'?" if near else ""))
        kind = type(getattr(type(cfg), key))
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{file}: option '{key}' is {shown(value)}, expected {kind.__name__}")
        setattr(cfg, key, convert(key, str(value).lower() if isinstance(value, bool) else str(value), kind, file))
    try:
        check_ranges(cfg)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return cfg


def run_config(out_dir):
    """The Config a run in out_dir was made with (its config.json), checked as the run checked it."""
    if not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: no such folder (python train.py --out_dir={out_dir} writes it)")
    file = os.path.join(out_dir, "config.json")
    if not os.path.exists(file):
        raise DataError(f"{file}: missing; is {out_dir} a folder written by python train.py?")
    cfg = apply_options(Config(), read_options(file), file, unknown="skip")
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return dataclasses.replace(cfg, out_dir=out_dir)


def convert(key, raw, kind, where=None):
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        return kind(raw)  # int("1.5") fails, float("0") is 0.0
    except ValueError:
        raise ConfigError((f"{where}: option '{key}' is {raw}" if where else f"--{key}={raw}") + f": expected {kind.__name__}") from None


def validate(cfg):
    """The options checked together before anything runs, so that nothing fails late or does nonsense
    (each alone was checked by check_ranges)."""
    if cfg.data == "builtin":  # 0 means every record of a data set; the built-in task makes what it is asked for
        for key in ("n_sft", "n_prefs", "n_align", "n_eval"):
            if getattr(cfg, key) == 0:
                raise ConfigError(f"--{key}=0: the built-in task makes as many records as asked; 0 (all) is for hh, tldr and jsonl")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")
    if cfg.max_new_tokens >= cfg.block_size:
        raise ConfigError(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in --block_size={cfg.block_size}")
    if cfg.data != "builtin" and not cfg.data_dir:
        raise ConfigError(f"--data={cfg.data} needs --data_dir=<folder with its files>")
    if cfg.stakes and cfg.data != "builtin":
        raise ConfigError(f"--stakes is a variant of the built-in task (--data=builtin), not of --data={cfg.data}")
    if cfg.data == "builtin" and cfg.data_dir:
        raise ConfigError(f"--data_dir={cfg.data_dir} is read only with --data=hh, tldr or jsonl (the built-in task "
                          f"makes its own data)")
    check_launch(cfg, world=1)
    online = [vcb.METHODS[m] for m in method_list(cfg) if vcb.METHODS[m].online]
    if any(not m.critic for m in online) and cfg.online_k < 2:
        raise ConfigError(f"--online_k={cfg.online_k}: RLOO's baseline is the other samples of a prompt, it needs at least 2")
    if any(m.critic for m in online) and cfg.ppo_minibatches > cfg.online_prompts:
        raise ConfigError(f"--ppo_minibatches={cfg.ppo_minibatches} is more than the --online_prompts={cfg.online_prompts} to split")


def sweep_list(cfg, key, kind):
    """A comma-separated option as a list of numbers: betas, or seeds (checked by RANGES[key])."""
    return [kind(v) for v in getattr(cfg, key).split(",")]


def method_list(cfg):
    return [m.strip() for m in cfg.methods.split(",") if m.strip()]


def usage(doc="", cls=Config):
    """The program's docstring, then every option with its default and the comment beside it in cls."""
    lines = ([doc.strip(), ""] if doc else []) + ["Options (--key=value):"]
    defaults = cls()
    for line in inspect.getsource(cls).splitlines()[2:]:
        m = re.match(r"\s+(\w+): \w+ = .+?\s+# (.*)", line)
        if m:
            lines.append(f"  --{m[1]}={getattr(defaults, m[1])}".ljust(39) + " " + m[2])
        elif line.strip().startswith("# ----"):
            lines.append(" " + line.strip()[6:])
    return "\n".join(lines)


def check_launch(cfg, world):
    """What the options ask of `world` processes (torchrun's), checked before the first stage: every
    training batch splits into world x grad_accum micro-batches, and the online methods, which run in
    one process, are not among those asked of several."""
    for key in ("sft_batch", "rm_batch", "align_batch"):
        if getattr(cfg, key) < world * cfg.grad_accum:
            raise ConfigError(f"--{key}={getattr(cfg, key)} cannot be split into " + (f"{world} processes x " if world > 1 else "")
                              + f"--grad_accum={cfg.grad_accum} micro-batches")
    online = [m for m in method_list(cfg) if vcb.METHODS[m].online]
    if world > 1 and online and cfg.stage in ("all", "align"):
        raise ConfigError(f"--methods has {', '.join(online)}, which run in one process: leave them out under torchrun "
                          f"(--methods={','.join(m for m in method_list(cfg) if m not in online)}) and train them "
                          f"afterwards with python train.py --stage=align")
