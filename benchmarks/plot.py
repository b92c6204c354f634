"""Plot time and peak memory against sequence length from the JSON rows ``bench_layer.py --json`` wrote: no
GPU or torch needed, so the plot of a GPU run can be (re)made anywhere matplotlib is installed.

    python benchmarks/plot.py rows.json [more.json ...] -o seq_len.png [--host GatedDeltaNet] [--title TEXT]

Rows of later files replace those of earlier ones for the same layer and length.
"""
from __future__ import annotations

import argparse

from record import plot_seq_len, read_rows  # benchmarks/ is the script's directory, so on sys.path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('json', nargs='+', help='files written by bench_layer.py --json')
    p.add_argument('-o', '--output', required=True, help='the PNG to write')
    p.add_argument('--host', help='only the rows of this host (a file may hold several)')
    p.add_argument('--title')
    args = p.parse_args()
    rows = read_rows(*args.json)
    if args.host:
        rows = [r for r in rows if r.get('host') == args.host]
    print(plot_seq_len(rows, args.output, title=args.title))


if __name__ == '__main__':
    main()
