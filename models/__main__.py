"""`python -m models list [--json]`: the architecture table."""

from __future__ import annotations

import argparse
import json
import sys

from .registry import list_specs

COLUMNS = (
    ("name", 24), ("family", 8), ("depth", 5), ("block", 10), ("preact", 6), ("plain", 5),
    ("shortcut", 8), ("params", 11), ("GMACs", 6), ("input_size", 11), ("emb", 4), ("classes", 7),
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models", description="The registered ResNet architectures."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    list_parser = sub.add_parser(
        "list", help="print every architecture with params and MACs at its default input size"
    )
    list_parser.add_argument(
        "--json", action="store_true", help="one JSON array instead of a table"
    )
    args = parser.parse_args(argv)

    rows = [spec.describe() for spec in list_specs()]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print("  ".join(title.ljust(width) for title, width in COLUMNS).rstrip())
    for r in rows:
        cells = (
            r["name"], r["family"], r["depth"], r["block"], r["preact"], r["plain"],
            r["shortcut"], f"{r['params']:,}", f"{r['macs'] / 1e9:.3f}",
            "x".join(map(str, r["input_size"])), r["embedding_dim"], r["num_classes"],
        )  # fmt: skip
        print("  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
