"""Draw one `headreg compare` figure from the head runs of one or more comparisons.

Each head's test features are extracted again from its saved model by headreg's one inference
pass (`extract_dataset`, as `headreg eval` runs it), and its row (test accuracy, options...) is
read from the comparison's `compare.json`. When a head appears in several comparisons, the last one given wins: this is
how docs/img/mnist_compare_paper.png shows a head rerun alone beside the others' run.

    HEADREG_DATA_DIR=../shared/data .venv/bin/python scripts/draw_compare.py \
        runs/paper-compare runs/paper-center --out docs/img/mnist_compare_paper.png \
        --title "mnist, 2-D features, preset paper"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import headreg
from headreg.compare import CompareEntry, plot_compare
from headreg.data import create_dataset
from headreg.engine.extract import extract_dataset
from headreg.engine.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparisons", nargs="+", type=Path, help="`headreg compare --out` directories")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows: dict[str, tuple[Path, dict]] = {}
    order: list[str] = []
    for cmp_dir in args.comparisons:
        table = json.loads((cmp_dir / "compare.json").read_text())
        for row in table["heads"]:
            if row["head"] not in rows:
                order.append(row["head"])
            rows[row["head"]] = (cmp_dir / row["head"], row)
    entries = []
    test_set = create_dataset(args.dataset, "test")
    device = resolve_device("auto")
    for head in order:
        run_dir, row = rows[head]
        ext = extract_dataset(headreg.load_model(run_dir), test_set, device=device, progress=False, desc=head)
        entries.append(
            CompareEntry(
                head=head,
                options=row["options"],
                test_accuracy=row["test_accuracy"],
                metrics={},
                train_seconds=row["train_seconds"],
                total_seconds=row["total_seconds"],
                warnings=[],
                embeddings=ext.embeddings.cpu(),
                labels=ext.labels.cpu(),
            )
        )
        print(f"{head}: {run_dir}, test accuracy {row['test_accuracy']:.4f}")
    plot_compare(entries, args.out, title=args.title)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
