"""Paper-claim reproductions in miniature (`vlkit experiment NAME`)."""

from __future__ import annotations

from pathlib import Path

from vlkit.fileio import atomic_path


def save_png(fig, path: str | Path) -> str:
    """Write a matplotlib figure atomically as PNG, close it, and return the file's name (for reports)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path.name
