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


def provenance() -> dict:
    """What a results file was measured with: the code's commit (and whether the tree had changes), the date,
    and the machine. Figures can vary across machines (CPU thread counts, BLAS kernels): quote them with this."""
    import datetime
    import os
    import platform
    import subprocess

    import torch

    from vlkit.version import __version__

    root = Path(__file__).resolve().parents[2]
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": commit, "dirty": dirty, "vlkit": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}


def provenance_line(p: dict) -> str:
    """'Measured at commit abc1234 on 2026-12-01 13:00 UTC, 2 CPUs (torch 2.13.0, 2 threads).'"""
    m = p["machine"]
    where = m["cuda"] or f"{m['cpus']} CPUs"
    commit = f"commit {p['commit']}{' + local changes' if p.get('dirty') else ''}" if p.get("commit") else \
        f"vlkit {p.get('vlkit')}"
    return (f"Measured at {commit} on {p['date']}, {where} (torch {m['torch']}, {m['torch_threads']} threads); "
            "figures can differ slightly on other machines (thread counts, BLAS kernels).")


def publish(out: Path, summary: dict, seconds: dict[str, float], started: float, chart, report, console) -> dict:
    """The end of an experiment: provenance and wall seconds (per stage, and in all since `started`, a
    perf_counter reading) into `summary`, then <out>/results.json, the chart (`chart(summary) -> file name`) and
    <out>/report.md (`report(summary, chart name)`)."""
    import time

    from vlkit.fileio import write_json, write_text

    summary["provenance"] = provenance()
    summary["seconds"] = {**{k: round(v, 1) for k, v in seconds.items()},
                          "total": round(time.perf_counter() - started, 1)}
    write_json(Path(out) / "results.json", summary)
    write_text(Path(out) / "report.md", report(summary, chart(summary)))
    console.print(f"report: {Path(out) / 'report.md'} ({summary['seconds']['total']:.0f}s)")
    return summary
