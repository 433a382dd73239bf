"""
tools/gpt2.py: GPT-2 weights in and out, in the `model.safetensors` + `config.json` layout of the public
GPT-2 releases, read and written with the safetensors package (no transformers needed, nothing
downloaded).

    model = gpt2.from_pretrained("gpt2/model.safetensors", block_size=256)   # what train.py's --init_from runs
    python -m tools.gpt2 export out/policy_vcb.pt out/vcb-gpt2              # a policy, for transformers and the rest

Every key and shape is checked; what our GPT cannot compute (another activation, LayerNorm epsilon,
MLP width or attention scaling) is refused with one line. An exported policy loads in transformers'
GPT2LMHeadModel with the same logits; its tokenizer is the run's (tokenizer.json, or GPT-2's own
with --tokenizer=gpt2).
"""
import os
import re

import torch

from machinery.files import DataError, atomic_path, field, make_folder, read_json, write_json
from model import GPT, GPTConfig


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)


def from_pretrained(path, block_size=None, log=print, **overrides):
    """A GPT initialised from a GPT-2 checkpoint in the common `model.safetensors` layout (the
    layout of the public GPT-2 releases), read from a local file: nothing is downloaded. Its shape and
    every key are checked first (pretrained_config); block_size crops the positions; overrides: other
    GPTConfig fields (dropout, reward_head)."""
    from safetensors.torch import load_file
    config = GPTConfig(**{**pretrained_config(path, log), **overrides})
    try:
        sd_hf = load_file(str(path))
    except Exception as e:  # a file that changed since its header was read
        raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    model = GPT(config)
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in sd_hf.items():
            k = k.removeprefix("transformer.")
            if "transformer." + k in sd:
                sd["transformer." + k].copy_(v.t() if k.endswith(CONV1D) else v)
    if block_size is not None and block_size < model.config.block_size:
        model.crop_block_size(block_size)
    return model


def pretrained_config(path, log=print):
    """The GPTConfig fields of a GPT-2 checkpoint, from the header of its model.safetensors (the names,
    shapes and types of its tensors, not their values: seconds for any size) and the config.json beside
    it (n_head cannot be read off the weights; without one, n_head = n_embd / 64 as in the four OpenAI
    sizes, and log says so). What our GPT cannot represent (another activation, LayerNorm epsilon or
    MLP width) is refused; every key and shape is checked against our GPT's on the meta device."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k.removeprefix("transformer."): (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                      for k in f.keys()}
    except Exception as e:  # a missing, truncated or foreign file
        raise DataError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    shapes = {k: v for k, v in shapes.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal masks, not weights
    shapes.pop("lm_head.weight", None)  # tied to wte
    for key in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight"):
        if key not in shapes or len(shapes[key][0]) != 2:
            raise DataError(f"{path}: no '{key}' matrix: not a GPT-2 checkpoint")
    n_embd = shapes["wte.weight"][0][1]
    args = dict(block_size=shapes["wpe.weight"][0][0], vocab_size=shapes["wte.weight"][0][0],
                n_layer=1 + max(int(m[1]) for k in shapes if (m := re.match(r"h\.(\d+)\.", k))),
                n_head=max(1, n_embd // 64), n_embd=n_embd, bias=True)  # GPT-2's heads are 64 wide
    config = read_gpt2_config(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
    if config is not None:
        args["n_head"] = gpt2_config(config, args)
    else:
        log(f"{path}: no GPT-2 config.json beside it; n_head = n_embd / 64 = {args['n_head']} as in OpenAI's GPT-2 "
            f"sizes (a checkpoint with other heads needs its config.json)")
    with torch.device("meta"):  # keys and shapes with no memory: the file may describe a huge model
        sd = GPT(GPTConfig(**args)).state_dict()
    ours = {k for k in sd if not k.startswith(("lm_head.", "reward_head."))}
    theirs = {"transformer." + k for k in shapes}
    if ours != theirs:
        raise DataError(f"{path}: keys differ from GPT-2's: missing {sorted(ours - theirs)[:3]}, "
                        f"unexpected {sorted(theirs - ours)[:3]}")
    for k, (shape, dtype) in shapes.items():
        shape = shape[::-1] if k.endswith(CONV1D) else shape  # GPT-2 stores these as Conv1D: (in, out)
        if shape != tuple(sd["transformer." + k].shape) or not dtype.startswith(("F", "BF")):
            raise DataError(f"{path}: {k} has shape {shape}, expected {tuple(sd['transformer.' + k].shape)} "
                            f"(and a floating-point tensor, this one is {dtype})")
    return args


def read_gpt2_config(file):
    """(file, its dict) when file is a Hugging Face GPT-2 config.json (model_type gpt2), else None: a
    missing file, or another program's config.json (a run folder of ours has one)."""
    if not os.path.exists(file):
        return None
    c = read_json(file, kind=object)
    return (file, c) if isinstance(c, dict) and c.get("model_type") == "gpt2" else None


def gpt2_config(config, args):
    """The n_head of a GPT-2 config.json, (file, dict), after checking that the rest of it describes a
    model our GPT is (args: the shape read off the weights); anything else is a one-line DataError.
    Each field is read through data.field, so a value of another type is named, not a traceback."""
    file, c = config
    checks = [("n_embd", args["n_embd"]), ("n_layer", args["n_layer"]), ("vocab_size", args["vocab_size"]),
              ("n_positions", args["block_size"])]
    for key, want in checks:
        if key in c and field(c, key, int, file) != want:
            raise DataError(f"{file}: {key} is {c[key]} but the weights say {want}")
    n_head = field(c, "n_head" if "n_head" in c else "num_attention_heads", int, file, lo=1)
    if args["n_embd"] % n_head:
        raise DataError(f"{file}: n_head is {n_head}, not a whole divisor of n_embd={args['n_embd']}")
    if "activation_function" in c and field(c, "activation_function", str, file) not in ("gelu_new", "gelu_pytorch_tanh"):
        raise DataError(f"{file}: activation_function {c['activation_function']!r} is not GPT-2's tanh GELU, "
                        f"the only one this GPT has")
    if "layer_norm_epsilon" in c and abs(field(c, "layer_norm_epsilon", float, file) - 1e-5) > 1e-12:
        raise DataError(f"{file}: layer_norm_epsilon {c['layer_norm_epsilon']} is not GPT-2's 1e-5, the only one this GPT has")
    if c.get("n_inner") is not None and field(c, "n_inner", int, file) != 4 * args["n_embd"]:
        raise DataError(f"{file}: n_inner {c['n_inner']} is not 4 * n_embd, the only MLP width this GPT has")
    for key, fine in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if key in c and field(c, key, bool, file) != fine:
            raise DataError(f"{file}: {key}={c[key]} is not what this GPT computes")
    return n_head


def save_pretrained(model, folder):
    """model (a GPT) as a GPT-2 checkpoint: folder/model.safetensors (transformers' key names, Conv1D
    matrices (in, out), the tied LM head left out, no reward head) and folder/config.json. Each file
    is written whole or not at all."""
    from safetensors.torch import save_file
    c = model.config
    weights = {k: (v.t() if k.endswith(CONV1D) else v).detach().float().contiguous().cpu().clone()
               for k, v in model.state_dict().items() if k.startswith("transformer.")}
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
              "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
              "tie_word_embeddings": True, "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1}
    make_folder(folder)
    with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(weights, tmp, metadata={"format": "pt"})
    write_json(os.path.join(folder, "config.json"), config)


def export(argv):
    """python -m tools.gpt2 export CHECKPOINT FOLDER: one of a run's models (a policy, sft.pt) as GPT-2."""
    from machinery.runtime import checkpoint_model, load_checkpoint
    if len(argv) != 2:
        raise DataError("usage: python -m tools.gpt2 export CHECKPOINT FOLDER   (e.g. out/policy_vcb.pt out/vcb-gpt2)")
    model = checkpoint_model(argv[0], load_checkpoint(argv[0]))
    save_pretrained(model, argv[1])  # without the reward head, if it has one
    print(f"wrote {argv[1]}/model.safetensors and config.json ({model.num_params() / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    from machinery.runtime import command
    command(lambda argv: export(argv[1:]) if argv[:1] == ["export"] else export([]))
