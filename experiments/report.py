"""
experiments/report.py: from the metrics of scored policies (evaluate.metrics) to the tables and
figures of train.py's eval stage and of the experiments: results tables, the reward/KL plot, the
training curves, the reward at matched KL. No models here: plain Python on lists of dicts, and
matplotlib for the figures. Run alone, it copies the tables and figures a run wrote into the
documentation:

    python -m experiments.report --out_dir=out   # every `<!-- from FILE -->` block of README.md and docs/*.md
"""
import glob
import math
import os
import re
import shutil
from dataclasses import dataclass

from evaluate import mean, reward_key, win_rate
from machinery import records
from machinery.files import atomic_path, write_text
from vcb import METHODS


COLORS = {"sft": "black", **{name: m.color for name, m in METHODS.items()}}  # SFT, then each method's own


def label(name):
    """A policy's name in figures: the method's label (vcb.METHODS), or SFT's."""
    return METHODS[name].label if name in METHODS else name.upper()


def beta_label(name, beta):
    """The beta column of a table: '-' for SFT and the methods without one (RRHF)."""
    return f"{beta:g}" if name in METHODS and METHODS[name].beta and beta is not None else "-"


def spread(values):
    """(mean, population std) of values, or None when there are none: a cell's spread over seeds."""
    if not values:
        return None
    m = mean(values)
    return (m, math.sqrt(mean([(v - m) ** 2 for v in values])))


def pearson(a, b):
    ma, mb = mean(a), mean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    norm = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return cov / norm if norm > 0 else float("nan")


def summarise(runs):
    """Sweep runs [{method, beta, seed, eval: metrics, ood: metrics}] ->
    {method: {beta: {set: {metric: (mean, std over seeds) or None}}}}."""
    groups = {}
    for run in runs:
        groups.setdefault(run["method"], {}).setdefault(run["beta"], []).append(run)
    summary = {}
    for method, by_beta in groups.items():
        for beta, group in by_beta.items():
            out = summary.setdefault(method, {}).setdefault(beta, {})
            for s in ("eval", "ood"):
                if s in group[0]:
                    out[s] = {}
                    for key in group[0][s]:
                        out[s][key] = spread([g[s][key] for g in group if g[s][key] is not None])
    return summary


def fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (tuple, list)):  # (mean, std) over seeds
        return f"{v[0]:.3f} ± {v[1]:.3f}"
    return f"{v:.3f}"


def results_table(results, judge):
    """results {method: {beta label: {"eval": metrics, "ood": metrics}}} -> a markdown table."""
    has_ood = any("ood" in r for by_beta in results.values() for r in by_beta.values())
    head = ["method", "beta", f"{judge} reward", "RM reward", "KL(pi||sft)", "win vs SFT", "win vs DPO", "distinct-2"]
    head += [f"OOD {judge} reward", "OOD win vs SFT", "OOD win vs DPO"] if has_ood else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reward = reward_key(judge)
    for method, by_beta in results.items():
        for beta, r in by_beta.items():
            e, o = r["eval"], r.get("ood", {})
            cells = [method, beta, fmt(e[reward]), fmt(e["rm_reward"]), fmt(e["kl"]), fmt(e["win_rate_vs_sft"]),
                     fmt(e["win_rate_vs_dpo"]), fmt(e["distinct_2"])]
            if has_ood:
                cells += [fmt(o.get(reward)), fmt(o.get("win_rate_vs_sft")), fmt(o.get("win_rate_vs_dpo"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on its file-only backend, imported when a figure is drawn (nothing else needs it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, file, dpi=120):
    """The figure as a PNG, written whole or not at all (files.atomic_path)."""
    with atomic_path(file) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_frontier(points, file, title, judge):
    """Reward (gold, or the RM's without a gold one) against KL(pi || pi_sft), one colour per method,
    like the paper's reward/KL figure. points: dicts of method, beta, kl, reward and optional
    kl_std, reward_std (error bars over seeds); a method with several betas is drawn as a curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    variants = list(dict.fromkeys(m.partition(" ")[2] for m in (p["method"] for p in points) if " " in m))
    for method in dict.fromkeys(p["method"] for p in points):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        base, _, variant = method.partition(" ")  # "vcb (gold)": VCB's colour, the variant's line style
        style = ["-", "--", ":", "-."][variants.index(variant) % 4] if variant else "-"
        ax.errorbar([p["kl"] for p in pts], [p["reward"] for p in pts], xerr=[p.get("kl_std", 0) for p in pts],
                    yerr=[p.get("reward_std", 0) for p in pts], marker="o", capsize=3, color=COLORS.get(base),
                    label=label(base) + (f" {variant}" if variant else ""), linestyle=style if len(pts) > 1 else "none")
        for p in pts:
            if p.get("beta") is not None and len(pts) > 1:
                ax.annotate(f"{p['beta']:g}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(pi || pi_sft), nats per response")
    ax.set_ylabel(f"{'gold' if judge == 'gold' else 'reward-model'} reward (held-out prompts)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, file)


# -----------------------------------------------------------------------------
# training curves: curves.png from curves.jsonl (machinery/records.py), one line per step of every training task

def plot_curves(file, png):
    """One panel per metric (loss, lr, margin, acc, gap_corr, ...), one line per training task,
    coloured and labelled by its method (a sweep's seeds and betas share their method's colour).
    Does nothing when there is no curves file or the figure is newer than it."""
    if not os.path.exists(file):
        return
    if os.path.exists(png) and os.path.getmtime(png) >= os.path.getmtime(file):
        return  # nothing new since the last drawing
    recorded = records.read_curves(file)
    if not recorded:
        return
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in recorded))
    metrics = [k for k in dict.fromkeys(["loss", "lr"] + [k for r in recorded for k in r]) if k not in ("task", "step")]
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        labelled = set()
        for task in tasks:
            pts = [(r["step"], r[metric]) for r in recorded if r["task"] == task and r.get(metric) is not None]
            method = task.split("-")[1] if "-" in task else task  # align-vcb, sweep-vcb-beta1-seed0 -> vcb
            if pts:
                ax.plot(*zip(*pts), label=None if method in labelled else method, color=COLORS.get(method),
                        linewidth=1, alpha=0.8)
                labelled.add(method)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(plt, fig, png, dpi=110)


# -----------------------------------------------------------------------------
# one number per method: the reward at matched KL

def interpolate(points, x):
    """points [(x, y)] of one curve; y at x by linear interpolation between the nearest points on
    either side, None when x is outside the measured range (never extrapolated)."""
    points = sorted(points)
    if not points or not points[0][0] <= x <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1]  # a single point, exactly at x


def matched_kl(runs, judge, kls=(2.0, 4.0, 8.0), split="eval", baseline="dpo"):
    """The reward of each method at fixed KL values, read off its reward/KL curve over beta: for each
    seed, the method's (KL, reward) points interpolated at each KL, then the mean and std over the
    seeds whose measured KL range covers it. runs: [{method, beta, seed, split: metrics}].
    Also, where the scored samples are at hand ("rows"), the win rate against `baseline` between the
    two policies nearest that KL in each seed: both policies are real, their KLs are reported beside.
    Returns {method: {kl: {"reward": (mean, std) or None, "seeds": k, "win": ..., ...}}}."""
    key, out = reward_key(judge), {}
    by_method = {}
    for r in runs:
        if r.get("beta") is not None and split in r:
            by_method.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    for method, by_seed in by_method.items():
        for kl in kls:
            values = [interpolate([(r[split]["kl"], r[split][key]) for r in rs], kl) for rs in by_seed.values()]
            values = [v for v in values if v is not None]
            cell = {"reward": spread(values), "seeds": len(values), "of": len(by_seed)}
            wins = []
            for seed, rs in by_seed.items():
                other = by_method.get(baseline, {}).get(seed)
                if method != baseline and other and "rows" in rs[0]:
                    a = min(rs, key=lambda r: abs(r[split]["kl"] - kl))
                    b = min(other, key=lambda r: abs(r[split]["kl"] - kl))
                    wins.append((win_rate(a["rows"][split], b["rows"][split], judge), a[split]["kl"], b[split]["kl"]))
            if wins:
                cell.update(win=spread([w for w, _, _ in wins]), kl_self=mean([k for _, k, _ in wins]),
                            kl_baseline=mean([k for _, _, k in wins]))
            out.setdefault(method, {})[kl] = cell
    return out


def matched_kl_table(summary, judge, baseline="dpo"):
    """The matched-KL summary as markdown: a row per method, a reward column per KL, then the win rate
    against the baseline between the policies nearest each KL (their mean KLs in brackets)."""
    kls = sorted({kl for cells in summary.values() for kl in cells})
    head = ["method"] + [f"{judge} reward at KL {kl:g}" for kl in kls] + [f"win vs {baseline.upper()} near KL {kl:g}" for kl in kls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, cells in summary.items():
        row = [method]
        for kl in kls:
            c = cells[kl]
            row.append("outside its range" if c["reward"] is None else
                       fmt(c["reward"]) + ("" if c["seeds"] == c["of"] else f" ({c['seeds']}/{c['of']} seeds)"))
        for kl in kls:
            c = cells[kl]
            row.append(f"{fmt(c['win'])} (KL {c['kl_self']:.1f} vs {c['kl_baseline']:.1f})" if "win" in c else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_steps(table, file, judge, factor):
    """The steps ablation: reward and KL against the fraction of training, a line per method (mean ±
    std over seeds). table {method: {multiple of the usual steps: [runs]}}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, [reward_key(judge), "kl"], [f"{judge} reward", "KL(pi || pi_sft)"]):
        for method, by_frac in table.items():
            xs = sorted(by_frac)
            stats = [spread([r["eval"][key] for r in by_frac[x]]) for x in xs]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        markersize=3, capsize=2, color=COLORS.get(method), label=label(method))
        ax.axvline(1, color="grey", linewidth=0.8, linestyle=":")  # the usual number of steps
        ax.set_xlabel("training, in multiples of the usual steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, file)


# -----------------------------------------------------------------------------
# the documentation's tables and figures are the files the runs wrote, copied in, never retyped

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
BLOCK = re.compile(r"(<!-- from (\S+) -->\n)(.*?)(<!-- end -->)", re.S)
IMAGE = re.compile(r"<!-- image (\S+) -->\n!\[[^\]]*\]\(([^)]+)\)")


def sync_docs(out_dir, files=None):
    """In each documentation file, the text between `<!-- from FILE -->` and `<!-- end -->` becomes
    FILE's (a path inside out_dir), and the image after `<!-- image FILE -->` becomes a copy of
    FILE. Files the run has not written are left as they were and listed. Returns (blocks copied,
    missing files)."""
    copied, missing = 0, []
    for doc in files or [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        with open(doc, encoding="utf-8") as f:
            text = f.read()

        def fill(m):
            nonlocal copied
            source = os.path.join(out_dir, m[2])
            if not os.path.isfile(source):
                missing.append(m[2])
                return m[0]
            copied += 1
            with open(source, encoding="utf-8") as f:
                body = f.read()
            return m[1] + "```\n" + body.strip("\n") + "\n```\n" + m[4] if m[2].endswith((".txt", ".log")) else \
                m[1] + body.rstrip() + "\n" + m[4]

        new = BLOCK.sub(fill, text)
        for m in IMAGE.finditer(new):
            source = os.path.join(out_dir, m[1])
            if os.path.isfile(source):
                with atomic_path(os.path.join(os.path.dirname(doc), m[2])) as tmp:  # the image's path is the doc's own
                    shutil.copyfile(source, tmp)
                copied += 1
            else:
                missing.append(m[1])
        if new != text:
            write_text(doc, new)
    return copied, sorted(set(missing))


@dataclass
class SyncConfig:
    out_dir: str = "out"             # the run whose files the documentation quotes


def main(argv):
    from machinery.config import parse_options  # only this command needs the option parser
    opts = parse_options(SyncConfig(), argv, __doc__)
    n, missing = sync_docs(opts.out_dir)
    print(f"copied {n} tables and figures from {opts.out_dir}" +
          (f"; not written yet, left as they were: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    from machinery.runtime import command  # one line and exit status 2 for a bad option or file
    command(main)
