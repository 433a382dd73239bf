"""
sample.py: see what the policies of a run write. For each prompt, every policy in the folder (SFT
and each trained method) samples a few responses, printed side by side, each with its reward-model
score, its gold reward (built-in task) and its log-probability under the SFT model (how far from
SFT the policy has gone to write it).

    python sample.py --prompt="I saw Night Train with my family."
    python sample.py --out_dir=out --prompt_file=prompts.txt --methods=sft,vcb,dpo --num_samples=5
    python sample.py                  # type prompts at the prompt, an empty line or Ctrl-D ends
    python sample.py --help

The run's own settings (context length, data, precision) come from its config.json; a seed gives
the same samples every time.
"""
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import data
from evaluate import decode, gold_reward, score_logps, score_rewards
from machinery.config import COUNT, METHODS, RANGES, ConfigError, Range, parse_options, run_config
from machinery.files import DataError, text_lines, valid_unicode
from machinery.runtime import command, load_model, path, setup


@dataclass
class SampleConfig:
    out_dir: str = "out"             # the run's folder, written by python train.py
    prompt: str = ""                 # one prompt (else --prompt_file, else typed at the prompt)
    prompt_file: str = ""            # a text file of prompts, one per line
    methods: str = "all"             # policies to sample, comma-separated from sft and the methods; all: every one in the folder
    num_samples: int = 3             # samples per prompt and policy
    max_new_tokens: int = 0          # longest response (0: the run's --max_new_tokens)
    temperature: float = 1.0         # sampling temperature (0: greedy)
    top_k: int = 0                   # keep only the k most likely tokens (0: off)
    top_p: float = 1.0               # keep the smallest set of tokens whose probability reaches p (1: off)
    seed: int = 0                    # the same seed gives the same samples
    device: str = "auto"             # auto, cpu, cuda, cuda:N


RANGES_HERE = {**RANGES, "max_new_tokens": Range(1, COUNT, "the run's"),  # here 0 means what the run used
               "temperature": Range(RANGES["temperature"].lo, RANGES["temperature"].hi, "greedy"),
               "methods": None}  # sft and the methods in the folder: checked against its files (policies)


def policies(cfg, methods):
    """{name: checkpoint} of the policies to sample: sft, then the methods in the order of METHODS."""
    if methods == "all":
        names = ["sft"] + [m for m in METHODS if os.path.exists(path(cfg, f"policy_{m}.pt"))]
    else:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        for m in names:
            if m not in ["sft"] + METHODS:
                raise ConfigError(f"--methods: unknown policy {m!r}; known: sft, {', '.join(METHODS)}")
    return {m: path(cfg, "sft.pt" if m == "sft" else f"policy_{m}.pt") for m in names}


def read_prompts(opts):
    if opts.prompt:
        return [opts.prompt]
    if opts.prompt_file:
        prompts = []
        for n, line in text_lines(opts.prompt_file):
            if isinstance(line, DataError):
                raise line
            if line.strip():
                prompts.append(line.rstrip("\r\n"))
        if not prompts:
            raise DataError(f"{opts.prompt_file}: no prompts (one per line)")
        return prompts
    return None  # typed, one at a time


def main(argv):
    opts = parse_options(SampleConfig(), argv, __doc__, RANGES_HERE)
    cfg = run_config(opts.out_dir)
    env = setup(SimpleNamespace(device=opts.device, dtype=cfg.dtype))
    enc = data.load_tokenizer(path(cfg, "tokenizer.json"))
    new_tokens = opts.max_new_tokens or cfg.max_new_tokens
    if new_tokens >= cfg.block_size:
        raise ConfigError(f"--max_new_tokens={new_tokens} leaves no room for a prompt in the run's block_size={cfg.block_size}")
    models = {name: load_model(file, env, enc, cfg).eval() for name, file in policies(cfg, opts.methods).items()}
    sft = models.get("sft") or load_model(path(cfg, "sft.pt"), env, enc, cfg).eval()
    rm = load_model(path(cfg, "rm.pt"), env, enc, cfg).eval() if os.path.exists(path(cfg, "rm.pt")) else None
    prompts = read_prompts(opts)
    try:
        for prompt in prompts or iter(input_prompt, None):
            show(opts, cfg, env, enc, models, sft, rm, prompt, new_tokens)
    except KeyboardInterrupt:
        print()


def input_prompt():
    try:
        text = input("prompt> ")
    except EOFError:
        return None
    return text if text.strip() else None


@torch.no_grad()
def show(opts, cfg, env, enc, models, sft, rm, prompt, new_tokens):
    """Each policy's samples for one prompt, one line each: scores, then the text."""
    print(f"\nprompt: {prompt!r}")
    if not valid_unicode(prompt):
        print("  (not valid Unicode text; skipped)")
        return
    ids = data.encode_prompt(enc, prompt, cfg.block_size - new_tokens)
    width = max(len(name) for name in models)
    print(f"  {'':{width}}  {'RM':>6} {'gold':>6} {'logp_sft':>9}  response")
    for name, model in models.items():
        g = torch.Generator(env.device).manual_seed(opts.seed)  # every policy draws from the same seed
        with env.autocast():
            outs = model.generate([ids], new_tokens, temperature=opts.temperature, top_k=opts.top_k or None,
                                  top_p=opts.top_p, stop_token=enc.eot_token, num_samples=opts.num_samples, generator=g)
        texts = [decode(enc, o) for o in outs]
        cut = ["" if o and o[-1] == enc.eot_token else " [cut at max_new_tokens]" for o in outs]
        logp_sft = score_logps(cfg, env, sft, [(ids, outs)])  # on the exact sampled tokens
        rm_scores = score_rewards(cfg, env, rm, [data.encode_group(enc, prompt, texts)]) if rm else [None] * len(texts)
        gold = gold_reward(cfg, texts, [prompt] * len(texts)) if cfg.data == "builtin" else [None] * len(texts)
        for text, r, g_, lp, c in zip(texts, rm_scores, gold, logp_sft, cut):
            print(f"  {name:{width}}  {fmt(r)} {fmt(g_)} {lp:9.2f}  {text!r}{c}")


def fmt(v):
    return f"{v:+6.2f}" if v is not None else f"{'-':>6}"


if __name__ == "__main__":
    command(main)
