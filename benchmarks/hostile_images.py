"""`vae encode` on hostile images: the exit code, the one line and the peak memory of each case.

    python benchmarks/hostile_images.py [--project DIR]

Each case is a folder of 20 good 28x28 PNGs plus one hostile file (tests/data/hostile_images.py
makes them), encoded with the small logged model of tests/fixtures/pre_move_model in a fresh
process, ``python -m vae encode``, run in ``--project`` (default: this checkout), so the code of
another checkout (say, from before a fix) can be measured the same way. The peak RSS is the
child's ``ru_maxrss``, read by a fresh wrapper process per case, so no case sees another's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.data import hostile_images as hostile  # noqa: E402

CASES = {
    "none (20 good PNGs only)": None,
    "PNG bomb 20000x20000 (400 M pixels)": ("bomb.png", lambda: hostile.bomb_png(20000)),
    "PNG 12000x12000 (144 M pixels, under PIL's own limit)": (
        "big.png",
        lambda: hostile.bomb_png(12000),
    ),
    "PNG with a zTXt chunk inflating to 4 MB": ("text.png", hostile.text_bomb_png),
    "animated GIF, 3 frames (given as a file)": ("animated.gif", lambda: hostile.frames("GIF")),
    "animated PNG, 3 frames": ("animated.png", lambda: hostile.frames("PNG")),
    "JPEG whose header says 60000x60000": ("liar.jpg", lambda: hostile.lying_jpeg(60000, 60000)),
    "JPEG whose header says 28x56": ("tall.jpg", lambda: hostile.lying_jpeg(28, 56)),
}
WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True, text=True)\n"
    "kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'rc': p.returncode, 'err': p.stderr.strip().splitlines(), 'kib': kib}))\n"
)


def run_case(tmp: Path, name: str, case: tuple | None, project: Path, model: Path) -> dict:
    folder = tmp / f"case{len(list(tmp.iterdir()))}"
    folder.mkdir()
    for i in range(20):
        (folder / f"good{i:02d}.png").write_bytes(hostile.good_png(10 * i))
    given = str(folder)
    if case is not None:
        filename, make = case
        (folder / filename).write_bytes(make())
        if not filename.endswith((".png", ".jpg")):  # a folder walk takes PNG and JPEG only
            given = str(folder / filename)
    out = tmp / "out.parquet"
    cmd = [sys.executable, "-m", "vae", "-q", "encode", "--model", str(model), given]
    cmd += ["--out", str(out), "--no-progress"]
    wrapped = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(project), *cmd], capture_output=True, text=True
    )
    result = json.loads(wrapped.stdout)
    size = sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("good"))
    return {"case": name, "bytes": size, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="where `python -m vae` runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = ROOT / "tests" / "fixtures" / "pre_move_model" / "model"
        work = Path(tmp) / "cases"
        work.mkdir()
        rows = [run_case(work, n, c, args.project.resolve(), model) for n, c in CASES.items()]
    print("| case | file on disk | exit | what it printed (last line) | peak RSS |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        line = r["err"][-1] if r["err"] else ""
        line = line.replace(tmp, "…") if isinstance(line, str) else line
        print(
            f"| {r['case']} | {r['bytes']:,} B | {r['rc']} | `{line}` | {r['kib'] / 1024:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
