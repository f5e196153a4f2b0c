"""Write the three demo datasets (images + same-stem .txt captions) from the synthetic shape world.

    .venv/bin/python scripts/make_demo_datasets.py              # datasets/demo-style, demo-character, demo-checks
    .venv/bin/python scripts/make_demo_datasets.py --out /tmp/x # somewhere else

demo-style: the base shapes drawn with horizontal stripes (a fill the base model never saw), captions ending in
the trigger word: "a red circle on a white background, zebrastyle".
demo-checks: the base shapes in a checkerboard of the colour and its dark shade, trigger "checkerstyle": a second
style, so that the demo preset is not tuned to stripes alone.
demo-character: a mushroom (a figure the base model never saw) called by its name: "a red zorbo on a white
background". What the scenes are is defined in trainer/demo/world.py (demo_dataset); this script only writes them.
"""
from __future__ import annotations

import argparse
from pathlib import Path


from trainer.config import PROJECT_ROOT as ROOT
from trainer.demo import world


def write_set(name: str, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("*.png")) + list(folder.glob("*.txt")):  # a rerun leaves no stale files
        old.unlink()
    written = []
    for i, (scene, caption) in enumerate(world.demo_dataset(name, n)):
        stem = f"{i:02d}-{scene.colour}-{scene.shape}"
        world.render(scene).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        written.append(folder / f"{stem}.png")
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "datasets"), help="parent folder of the sets")
    ap.add_argument("--images", type=int, default=16, help="images per set")
    args = ap.parse_args(argv)
    for name in world.DEMO_SETS:
        files = write_set(name, Path(args.out) / name, args.images)
        print(f"{Path(args.out) / name}: {len(files)} images")


if __name__ == "__main__":
    main()
