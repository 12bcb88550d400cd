"""One PNG per entry: reward, step time by phase (stacked), train/generation logprob error, peak memory.

Drawn with matplotlib's object API on an Agg canvas, so importing this never switches the process's pyplot
backend. Thresholds of the entry's assertions on a plotted metric are drawn as dashed lines.
"""

from __future__ import annotations

import io

from megatron_rl.nightly.assertions import Assertion
from megatron_rl.nightly.metrics import RunMetrics

PHASES = ("generate", "score", "logprobs", "train", "refit")


def _missing(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what} not logged", ha="center", va="center", transform=ax.transAxes, color="grey")


def _thresholds(ax, metric: str, assertions: list[Assertion]) -> None:
    for a in assertions:
        if a.metric == metric and a.op != "==":
            ax.axhline(
                a.threshold,
                color="crimson",
                linestyle="--",
                linewidth=1,
                label=f"{a.expression} {a.op} {a.threshold:g}",
            )


def _line(ax, m: RunMetrics, metric: str, title: str, assertions: list[Assertion], ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if metric not in m.series:
        _missing(ax, metric)
        return
    ax.plot(m.steps[metric], m.series[metric], marker=".", linewidth=1.2)
    _thresholds(ax, metric, assertions)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _reward(ax, m: RunMetrics, assertions: list[Assertion]) -> None:
    ax.set_title("reward", fontsize=10)
    ax.set_xlabel("step")
    if "reward/mean" not in m.series and "eval/accuracy" not in m.series:
        _missing(ax, "reward/mean")
        return
    if "reward/mean" in m.series:
        steps, mean = m.steps["reward/mean"], m.series["reward/mean"]
        ax.plot(steps, mean, label="reward/mean", linewidth=1.2)
        if m.steps.get("reward/std") == steps:
            std = m.series["reward/std"]
            ax.fill_between(
                steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.15
            )
    if "eval/accuracy" in m.series:
        ax.plot(m.steps["eval/accuracy"], m.series["eval/accuracy"], "o-", label="eval/accuracy", linewidth=1)
    _thresholds(ax, "reward/mean", assertions)
    ax.legend(fontsize=7)


def _step_time(ax, m: RunMetrics) -> None:
    ax.set_title("step time by phase", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    if "timing/step_s" not in m.series:
        _missing(ax, "timing/step_s")
        return
    steps = m.steps["timing/step_s"]
    index = {s: i for i, s in enumerate(steps)}
    bottom = [0.0] * len(steps)
    for phase in PHASES:
        key = f"timing/{phase}_s"
        if key not in m.series:
            continue
        heights = [0.0] * len(steps)
        for s, v in zip(m.steps[key], m.series[key]):
            if s in index:
                heights[index[s]] = v
        ax.bar(steps, heights, bottom=bottom, label=phase, width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    # What the named phases do not cover (batch shaping, metrics, checkpoint saves).
    other = [max(0.0, t - b) for t, b in zip(m.series["timing/step_s"], bottom)]
    ax.bar(steps, other, bottom=bottom, label="other", width=0.8, color="lightgrey")
    # Headroom above the tallest bar keeps the legend off the bars.
    ax.set_ylim(0, 1.45 * max([b + o for b, o in zip(bottom, other)] + [1e-9]))
    ax.legend(fontsize=7, ncol=3, loc="upper right", framealpha=0.8)


def entry_png(m: RunMetrics, title: str, assertions: list[Assertion]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.5), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    _reward(axes[0][0], m, assertions)
    _step_time(axes[0][1], m)
    _line(axes[1][0], m, "train/token_mult_prob_error", "train/generation prob error", assertions, "ratio")
    _line(axes[1][1], m, "memory/peak_gb", "peak memory", assertions, "GB")
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    # Fixed margins: tight_layout would draw the whole figure an extra time.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.9, hspace=0.4, wspace=0.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
