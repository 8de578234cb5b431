"""python -m lab.data render|sheet|info: make, look at and check i-CLEVR data roots."""
import argparse
import sys
import time
from pathlib import Path

from lab.errors import UserError, reports_user_errors


def contact_sheet(root, out, count=24, columns=6):
    """A PNG grid of training renders, each titled with its labels, so a person can see the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from lab.data.iclevr import read_json
    table = read_json(Path(root) / "train.json")
    names = list(table)[:count]
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.4, rows * 2.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        with Image.open(Path(root) / "iclevr" / name) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title("\n".join(table[name]), fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def info(root, image_size=64):
    from lab.data.iclevr import load_condition_sets, load_train
    data = load_train(root, image_size=image_size)
    freq = data.labels.sum(0)
    print(f"{root}: {len(data.names)} images {tuple(data.images.shape[1:])}, {len(data.label_names)} labels, "
          f"label frequency {int(freq.min())}..{int(freq.max())}")
    for split in ("test.json", "new_test.json", "val.json", "heldout_test.json"):
        if (Path(root) / split).is_file():
            sets = load_condition_sets(root, split)
            sizes = sets.sum(1).int().tolist()
            print(f"  {split}: {len(sizes)} label sets ({', '.join(f'{sizes.count(k)}×{k}' for k in (1, 2, 3))})")


@reports_user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lab.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render a synthetic i-CLEVR root in the real format")
    render.add_argument("--out", required=True, help="folder to create")
    render.add_argument("--scenes", type=int, default=6003, help="one image per object (default 6003 -> 18,009)")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--objects", type=int, default=3, choices=range(1, 6), metavar="1..5",
                        help="objects per scene; a scene gives one image per prefix (default 3, as i-CLEVR)")
    render.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    render.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the PNGs (the real ones are 320x240)")
    sheet = sub.add_parser("sheet", help="write a contact sheet of a root's training images")
    sheet.add_argument("root")
    sheet.add_argument("--out", default=None, help="PNG path (default ROOT/contact_sheet.png)")
    sheet.add_argument("--count", type=int, default=24)
    check = sub.add_parser("info", help="load a root with the reader and print what it holds")
    check.add_argument("root")
    args = parser.parse_args(argv)
    if args.command == "render":
        from lab.data.synthetic import write_root
        if args.scenes < 1:
            raise UserError("--scenes", f"must be at least 1, got {args.scenes}")
        width, height = (int(v) for v in args.size.lower().split("x"))
        start = time.time()
        root = write_root(args.out, scenes=args.scenes, seed=args.seed, width=width, height=height,
                          workers=args.workers, objects=args.objects)
        print(f"wrote {args.objects * args.scenes} images to {root} in {time.time() - start:.1f} s")
        print(f"contact sheet: {contact_sheet(root, root / 'contact_sheet.png')}")
    elif args.command == "sheet":
        print(contact_sheet(args.root, args.out or Path(args.root) / "contact_sheet.png", args.count))
    else:
        info(Path(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
