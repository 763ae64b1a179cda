"""Draw one `headreg compare` figure from the head runs of one or more comparisons.

Each head's test features are extracted again from its saved model (`headreg eval
--save-embeddings`), and its row (test accuracy, options...) is read from the comparison's
`compare.json`. When a head appears in several comparisons, the last one given wins: this is
how docs/img/mnist_compare_paper.png shows a head rerun alone beside the others' run.

    HEADREG_DATA_DIR=../shared/data .venv/bin/python scripts/draw_compare.py \
        runs/paper-compare runs/paper-center --out docs/img/mnist_compare_paper.png \
        --title "mnist, 2-D features, preset paper"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from headreg.compare import CompareEntry, plot_compare


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
    with tempfile.TemporaryDirectory() as tmp:
        for head in order:
            run_dir, row = rows[head]
            emb = Path(tmp) / f"{head}.safetensors"
            cmd = [sys.executable, "-m", "headreg", "eval", "--checkpoint", str(run_dir), "--dataset", args.dataset,
                   "--metrics", "classification", "--save-embeddings", str(emb), "--no-progress"]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            saved = load_file(str(emb))
            entries.append(
                CompareEntry(
                    head=head,
                    options=row["options"],
                    test_accuracy=row["test_accuracy"],
                    metrics={},
                    train_seconds=row["train_seconds"],
                    total_seconds=row["total_seconds"],
                    warnings=[],
                    embeddings=saved["embeddings"],
                    labels=saved["labels"],
                )
            )
            print(f"{head}: {run_dir}, test accuracy {row['test_accuracy']:.4f}")
    plot_compare(entries, args.out, title=args.title)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
