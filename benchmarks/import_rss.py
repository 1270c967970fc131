"""Peak memory of `vlkit data import` against input size: the import streams, so 10x the records should cost
far less than 2x the memory.

    python benchmarks/import_rss.py                  # 10000 and 100000 records
    python benchmarks/import_rss.py --sizes 200 2000

For each size it writes a synthetic LLaVA-instruct JSON array (1-3 turns of ~300 characters, half the records
with an image; no image files, so the import runs with check_images=False), then imports it in a fresh Python
process that prints its own peak RSS (ru_maxrss) when done: one process per measurement, so sizes never mix.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = ("import json, resource, sys, time; from vlkit.data.importers import import_file; t = time.perf_counter(); "
         "s = import_file('llava', sys.argv[1], sys.argv[2], check_images=False, overwrite=True, progress=False); "
         "print(json.dumps({'seconds': time.perf_counter() - t, 'written': s['written'], "
         "'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))")


def synthetic_llava(path: Path, n: int, seed: int = 0) -> None:
    """A LLaVA-instruct-like JSON array of `n` records, written one record at a time."""
    rng = random.Random(seed)
    words = ("the a red blue green small large square circle triangle left right above below next to near image "
             "shows picture of with and is there in on behind front colour shape count many").split()
    pool = [" ".join(rng.choice(words) for _ in range(70))[:300] for _ in range(2000)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            turns = []
            for t in range(rng.randint(1, 3)):
                turns += [{"from": "human", "value": rng.choice(pool)}, {"from": "gpt", "value": rng.choice(pool)}]
            record = {"id": f"synth-{i:08d}", "conversations": turns}
            if i % 2 == 0:
                record["image"] = f"{i // 10000:05d}/{i:09d}.jpg"
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            f.write(("," if i else "") + json.dumps(record) + "\n")
        f.write("]\n")


def measure(src: Path, out: Path) -> tuple[dict, list[str]]:
    cmd = [sys.executable, "-c", CHILD, str(src), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"import of {src} failed:\n{res.stderr}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["rss_mib"] = row["maxrss"] / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    return row, cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000], help="Records per synthetic file.")
    ap.add_argument("--dir", type=Path, default=None, help="Keep the files here (default: a temporary folder).")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in sorted(args.sizes):
            src, out = work / f"llava_{n}.json", work / f"records_{n}.jsonl"
            synthetic_llava(src, n)
            row, cmd = measure(src, out)
            if row["written"] != n:
                sys.exit(f"{src}: wrote {row['written']} of {n} records")
            rows.append((n, src.stat().st_size / 2**20, row["seconds"], row["rss_mib"]))
        base = rows[0][3]
        print(f"{'records':>9} {'input MiB':>10} {'seconds':>8} {'peak RSS MiB':>13} {'ratio':>6}")
        for n, mib, sec, rss in rows:
            print(f"{n:>9} {mib:>10.1f} {sec:>8.2f} {rss:>13.1f} {rss / base:>6.2f}")
        print(f"command (one fresh process per size; ratio to the smallest):\n  {shlex.join(cmd)}")
        if args.dir is None:
            print("(the files were in a temporary folder, now removed; --dir DIR keeps them)")
        print(f"same import from the shell:\n  python -m vlkit data import llava {src} --out {out} "
              "--no-check-images --overwrite")


if __name__ == "__main__":
    main()
