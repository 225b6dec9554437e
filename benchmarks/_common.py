"""Pieces shared by the benchmark scripts: the code version a result was measured with, and
the speedup bar plot (ratio per config, 1× and 1.5× lines)."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """HEAD and whether the planner's sources (autopar/, cost/, solvers/, examples/) had uncommitted edits."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "autopar", "cost", "solvers", "examples"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ratio_plot(path: Path, labels: list[str], ratios: list[float], notes: list[str], *, ylabel: str, title: str,
               bar_width: float, label_size: int, rotation: int = 0) -> None:
    """Bars of ``ratios`` (green ≥ 1, red < 1) with "r×" + note on top; lines at 1× and 1.5×."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, bar_width * len(ratios) + 2), 4))
    ax.bar(range(len(ratios)), ratios, color=["tab:green" if v >= 1 else "tab:red" for v in ratios])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.5, color="gray", lw=0.8, ls="--")
    for i, (v, note) in enumerate(zip(ratios, notes)):
        ax.text(i, v, f"{v:.2f}×" + (f"\n{note}" if note else ""), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(ratios)), labels, fontsize=label_size, rotation=rotation)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(ratios + [1.6]) * 1.2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
