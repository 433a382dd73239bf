"""
machinery/progress.py: what a training loop hands to the machinery, one call each: resume from the
task's checkpoint (Progress(...)), the metrics of each step (record), the policies kept along the way
(snapshot), the resumable checkpoint after a health check (checkpoint), and the last health check
(finish). The loops themselves are in train.py and ppo.py.

What it guarantees: a run killed at any point and started again sees the batches, learning rates and
random numbers it would have seen, and ends with the same weights; the metrics are read from the
device once per --log_interval steps; a non-finite loss or broken weights stop the run with the
step, and the last good checkpoint is kept (nothing is saved between two readings).
"""
import math
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from machinery import records
from machinery.config import peek
from machinery.files import DataError, field, remove
from machinery.runtime import TrainingError, barrier, load_checkpoint, log, note_progress, path, save_checkpoint, save_model


def progress_file(cfg, task):
    return path(cfg, f"{task.name}.ckpt.pt")


class Progress:
    """One training task's bookkeeping. state {name: model or optimizer}: what its checkpoint holds,
    the first model being the one trained; total: its steps (PPO and RLOO: iterations); extra: plain
    values the steps change (PPO's adaptive beta), saved and resumed with the state."""

    def __init__(self, cfg, env, task, state, total, unit="step", extra=None):
        self.cfg, self.env, self.task, self.state, self.total, self.unit = cfg, env, task, state, total, unit
        self.models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
        self.start, self.extra = self.resume()
        self.extra = {**(extra or {}), **self.extra}
        self.last_good = self.start or None
        self.pending = []  # (step, lr, metrics) whose tensors are not read yet
        self.curves = os.path.join(os.path.dirname(task.outputs[0]), "curves.jsonl")
        if env.master:
            records.curves_from(self.curves, task.name, self.start)  # a resumed run continues its curve, a new one starts afresh
        self.bar = tqdm(total=total, initial=self.start, desc=task.name, disable=not (env.master and env.bars),
                        dynamic_ncols=True, leave=False)

    def resume(self):
        """(the step to continue from, the extra values) from the task's resumable checkpoint when it
        was made with the settings the task has read so far; (0, {}) afresh."""
        cfg, env, task, file = self.cfg, self.env, self.task, progress_file(self.cfg, self.task)
        if not os.path.exists(file):
            return 0, {}
        try:
            ck = load_checkpoint(file)
        except DataError:  # torch's words ("failed finding central directory") would not say what to do
            raise DataError(f"{file}: a resumable checkpoint of {task.name} that cannot be read (cut short or damaged): "
                            f"delete it to start the task over") from None
        if not records.same_settings(cfg, env, task, ck.get("settings")):
            log(env, f"{task.name}: {file} was made with other settings; starting over")
            return 0, {}
        step, extra = field(ck, "step", int, file, lo=0), field(ck, "extra", dict, file) if "extra" in ck else {}
        try:  # what torch checks of a state dict (keys, shapes, an optimizer's groups) is all there is to check
            for k, v in self.state.items():
                v.load_state_dict(field(ck, k, dict, file))
            torch.set_rng_state(ck["rng"])
            if env.device_type == "cuda" and "cuda_rng" in ck:
                torch.cuda.set_rng_state(ck["cuda_rng"], env.device)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise DataError(f"{file}: not a resumable checkpoint of {task.name} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); delete it to start the task over") from None
        log(env, f"{task.name}: resuming from {file} at step {step}")
        return step, extra

    def record(self, step, lr, metrics):
        """Step `step` (0-based) is done: its metrics (tensors stay on the device) are read together with
        the other pending ones every log_interval steps and before a snapshot or a checkpoint; then
        each step's go to curves.jsonl beside the task's output and a line to the log."""
        n = step + 1
        note_progress(f"{self.task.name} {self.unit} {min(n + 1, self.total)}/{self.total}")  # the one under way
        self.pending.append((step, lr, metrics))
        self.bar.update(1)
        if n % peek(self.cfg, "log_interval") == 0 or n == self.total or n in self.task.snapshots or self.checkpoint_due(n):
            self.read()

    def read(self):
        """Every pending step's metrics in one read from the device: checked, recorded, logged."""
        pending, self.pending = self.pending, []
        tensors = [v.detach().float().reshape(()) for _, _, m in pending for v in m.values() if torch.is_tensor(v)]
        values = iter(torch.stack([v.to(tensors[0].device) for v in tensors]).tolist() if tensors else [])
        rows = [(i, lr, {k: next(values) if torch.is_tensor(v) else v for k, v in m.items()}) for i, lr, m in pending]
        for i, _, m in rows:
            if not math.isfinite(m.get("loss", 0.0)):
                raise TrainingError(f"{self.task.name}: the loss is {m['loss']} at {self.unit} {i}; stopped, and {self.kept()}")
        if self.env.master:
            records.curves_append(self.curves, *({"task": self.task.name, "step": i + 1, "lr": lr, **m} for i, lr, m in rows))
        i, _, m = rows[-1]
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in m.items()})
        if (i + 1) % peek(self.cfg, "log_interval") == 0 or i + 1 == self.total:
            log(self.env, f"{self.task.name} {self.unit} {i + 1}/{self.total}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))

    def snapshot(self, n, model, enc):
        """After n steps, the model as it is then, where the task keeps one (the experiments)."""
        if n in self.task.snapshots:
            save_model(self.cfg, self.env, self.task.snapshots[n], model, enc, step=n)

    def checkpoint_due(self, n):
        every = peek(self.cfg, "ckpt_interval")
        return n % every == 0 and n < self.total

    def checkpoint(self, n, probe):
        """After n steps, every ckpt_interval: the health check (finite weights, a finite probe(), a loss
        on a few examples), then a resumable checkpoint <task>.ckpt.pt: the state, the step, the random
        state, the settings read so far and the extra values."""
        if not self.checkpoint_due(n):
            return
        self.check_healthy(probe, n)
        if self.env.master:
            ck = {k: v.state_dict() for k, v in self.state.items()}
            ck.update(step=n, settings=records.settings_so_far(self.cfg, self.env, self.task), rng=torch.get_rng_state(), extra=self.extra)
            if self.env.device_type == "cuda":
                ck["cuda_rng"] = torch.cuda.get_rng_state(self.env.device)
            save_checkpoint(progress_file(self.cfg, self.task), ck)
        self.last_good = n

    def finish(self, probe):
        """The health check after the last step, before the trained model may be saved."""
        self.bar.close()
        if self.total > self.start:
            self.check_healthy(probe, None)

    def check_healthy(self, probe, n):
        """Stop with a TrainingError unless the models' weights are finite and probe() is finite too:
        weights can stay finite and still be so large that every output overflows (one step at
        --align_lr=1e30), which only a forward pass shows. n None: the end."""
        ok = all(all(p.isfinite().all() for p in m.parameters()) for m in self.models)
        if ok:
            with torch.no_grad(), self.env.autocast():
                ok = bool(torch.isfinite(probe()))
        if self.env.world > 1:  # every process must agree, or the ones that stop leave the others waiting
            flag = torch.tensor(float(ok), device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        if not ok:
            when = "the last step" if n is None else f"step {n}"
            raise TrainingError(f"{self.task.name}: the model is broken after {when} (non-finite weights or loss; learning "
                                f"rate too high?); {'nothing was saved as finished, and ' if n is None else 'stopped, and '}"
                                f"{self.kept()}")

    def kept(self):
        return (f"the last good checkpoint, {progress_file(self.cfg, self.task)} (step {self.last_good}), is kept"
                if self.last_good else "no checkpoint was written yet")


def finish_task(cfg, env, task, model, enc, **extra):
    """Write a trained model atomically, then drop its resumable checkpoint."""
    save_model(cfg, env, task.outputs[0], model, enc, **extra)
    if env.master:
        remove(progress_file(cfg, task))
    barrier(env)
