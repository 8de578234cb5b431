"""python -m lab.data prepare|render|sheet|info: make ready, make, look at and check i-CLEVR data roots."""
import argparse
import sys
import time
from pathlib import Path

import torch

from lab.data.iclevr import decode, load_condition_sets, load_train, normalize
from lab.data.labels import load_objects, read_train_table
from lab.data.prepare import prepare_root
from lab.data.synthetic import write_root
from lab.errors import UserError, reports_user_errors
from lab.grids import labelled_grid


def contact_sheet(root, out, count=24, columns=6):
    """A PNG grid of training images at 128 pixels, each captioned with its labels, so a person can see the data."""
    names, indices = read_train_table(root)
    label_names = load_objects(root)
    images = torch.stack([torch.from_numpy(decode(Path(root) / "iclevr" / name, 128)) for name in names[:count]])
    captions = [[label_names[i] for i in labels] for labels in indices[:count]]
    labelled_grid(normalize(images), captions, nrow=columns).save(out)
    return out


def info(root, image_size=64):
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
    prepare = sub.add_parser("prepare", help="check a real i-CLEVR folder and write the val.json model selection "
                                             "needs, its label sets held out of training")
    prepare.add_argument("root", help="the folder with objects.json, train.json, test.json, new_test.json, iclevr/")
    prepare.add_argument("--seed", type=int, default=0, help="which label sets val.json takes (default: 0)")
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
    if args.command == "prepare":
        print(prepare_root(Path(args.root).expanduser(), args.seed))
    elif args.command == "render":
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
