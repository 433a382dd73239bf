"""
gpt2.py: GPT-2 weights in and out, in the `model.safetensors` + `config.json` layout of the public
GPT-2 releases, read and written with the safetensors package (no transformers needed, nothing
downloaded).

    model = gpt2.from_pretrained("gpt2/model.safetensors", block_size=256)   # what train.py's --init_from runs

Every key and shape is checked; what our GPT cannot compute (another activation, LayerNorm epsilon,
MLP width or attention scaling) is refused with one line.
"""
import json
import os

import torch

from data import DataError
from model import GPT, GPTConfig


def from_pretrained(path, block_size=None, log=print, **overrides):
    """A GPT initialised from a GPT-2 checkpoint in the common `model.safetensors` layout (the
    layout of the public GPT-2 releases), read from a local file: nothing is downloaded. The shape
    comes from the config.json beside it (n_head cannot be read off the weights); without one,
    n_head = n_embd / 64 as in the four OpenAI sizes, and log says so. What our GPT cannot
    represent (another activation, LayerNorm epsilon or MLP width) is refused. Every key and
    shape is checked. block_size crops the positions; overrides: other GPTConfig fields
    (dropout, reward_head)."""
    from safetensors.torch import load_file
    try:
        sd_hf = load_file(str(path))
    except Exception as e:  # a missing, truncated or foreign file
        raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    sd_hf = {k.removeprefix("transformer."): v for k, v in sd_hf.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers, not weights
    sd_hf.pop("lm_head.weight", None)  # tied to wte
    for key in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight"):
        if key not in sd_hf:
            raise DataError(f"{path}: no '{key}': not a GPT-2 checkpoint")
    n_embd = sd_hf["wte.weight"].shape[1]
    args = dict(block_size=sd_hf["wpe.weight"].shape[0], vocab_size=sd_hf["wte.weight"].shape[0],
                n_layer=1 + max(int(k.split(".")[1]) for k in sd_hf if k.startswith("h.")),
                n_head=max(1, n_embd // 64), n_embd=n_embd, bias=True)  # GPT-2's heads are 64 wide
    config = read_gpt2_config(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
    if config is not None:
        args["n_head"] = gpt2_config(config, args)
    else:
        log(f"{path}: no GPT-2 config.json beside it; n_head = n_embd / 64 = {args['n_head']} as in OpenAI's GPT-2 "
            f"sizes (a checkpoint with other heads needs its config.json)")
    model = GPT(GPTConfig(**{**args, **overrides}))
    sd = model.state_dict()
    ours = {k for k in sd if not k.startswith(("lm_head.", "reward_head."))}
    theirs = {"transformer." + k for k in sd_hf}
    if ours != theirs:
        raise DataError(f"{path}: keys differ from GPT-2's: missing {sorted(ours - theirs)[:3]}, "
                        f"unexpected {sorted(theirs - ours)[:3]}")
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for k, v in sd_hf.items():
            v = v.t() if k.endswith(conv1d) else v  # GPT-2 stores these as Conv1D: (in, out)
            target = sd["transformer." + k]
            if v.shape != target.shape:
                raise DataError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(target.shape)}")
            target.copy_(v)
    if block_size is not None and block_size < model.config.block_size:
        model.crop_block_size(block_size)
    return model


def read_gpt2_config(file):
    """(file, its dict) when file is a Hugging Face GPT-2 config.json (model_type gpt2), else None: a
    missing file, or another program's config.json (a run folder of ours has one)."""
    try:
        with open(file, encoding="utf-8") as f:
            c = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: not a readable config.json ({e})") from None
    return (file, c) if isinstance(c, dict) and c.get("model_type") == "gpt2" else None


def gpt2_config(config, args):
    """The n_head of a GPT-2 config.json, (file, dict), after checking that the rest of it describes a
    model our GPT is (args: the shape read off the weights); anything else is a one-line DataError."""
    file, c = config
    checks = [("n_embd", args["n_embd"]), ("n_layer", args["n_layer"]), ("vocab_size", args["vocab_size"]),
              ("n_positions", args["block_size"])]
    for key, want in checks:
        if key in c and c[key] != want:
            raise DataError(f"{file}: {key} is {c[key]} but the weights say {want}")
    n_head = c.get("n_head", c.get("num_attention_heads"))
    if not isinstance(n_head, int) or n_head < 1 or args["n_embd"] % n_head:
        raise DataError(f"{file}: n_head is {n_head!r}, not a whole divisor of n_embd={args['n_embd']}")
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise DataError(f"{file}: activation_function {c['activation_function']!r} is not GPT-2's tanh GELU, "
                        f"the only one this GPT has")
    if abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise DataError(f"{file}: layer_norm_epsilon {c['layer_norm_epsilon']} is not GPT-2's 1e-5, the only one this GPT has")
    if c.get("n_inner") not in (None, 4 * args["n_embd"]):
        raise DataError(f"{file}: n_inner {c['n_inner']} is not 4 * n_embd, the only MLP width this GPT has")
    for key, fine in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if c.get(key, fine) != fine:
            raise DataError(f"{file}: {key}={c[key]} is not what this GPT computes")
    return n_head
