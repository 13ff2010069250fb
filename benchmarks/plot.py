"""Charts and a text table from the benchmark CSVs.

    python benchmarks/plot.py [RESULTS_DIR] [--table] [--no-plot]

For every device folder RESULTS_DIR/<gpu>/ and every op CSV in it, keeps the latest row of each
(provider, mode, shape, dtype) and draws RESULTS_DIR/<gpu>/<op>.png: one column per mode, the
ratio to the base on top and the ratio to the floor below, one bar per provider for each shape.
``--table`` prints the same numbers as text (cell: x base / x floor).

An op CSV is a file whose header is the benchmark columns (_common.COLUMNS); the other CSVs
under RESULTS_DIR are read by nobody here: floors.csv (each run's measured matmul rate and copy
bandwidth, read for the floors), the compile check's tables (RESULTS_DIR/compile/) and the
pretraining run's curves (<gpu>/pretrain/, plotted by the run itself into loss.png and memory.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402
from _common import COLUMNS, MODES, RESULTS_DIR, csv_header, ratio_to_floor, read_csv  # noqa: E402


def latest_rows(csv_path: Path, floors: dict) -> list[dict]:
    """The latest row of each (provider, mode, shape, dtype), in first-measured order, with
    ``x_base`` and ``x_floor`` (None where unknown) added. Files are appended in time order."""
    latest: dict[tuple, dict] = {}
    for r in read_csv(csv_path):
        latest[(r["provider"], r["mode"], r["shape"], r["dtype"])] = r
    out = []
    for r in latest.values():
        rates = floors.get((r["op"], r["dtype"], r["timestamp"]))
        r["x_base"] = float(r["ratio_to_base"]) if r["ratio_to_base"] else None
        r["x_floor"] = ratio_to_floor(r, *rates) if rates else None
        out.append(r)
    return out


def read_floors(device_dir: Path) -> dict:
    path = device_dir / "floors.csv"
    if not path.exists():
        return {}
    return {(f["op"], f["dtype"], f["timestamp"]): (float(f["matmul_tflops"]), float(f["copy_gbps"]))
            for f in read_csv(path)}


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _modes(rows: list[dict]) -> list[str]:
    present = _ordered(r["mode"] for r in rows)
    return [m for m in MODES if m in present] + [m for m in present if m not in MODES]


def _providers(rows: list[dict]) -> list[str]:
    base = ["base"] * any(r["provider"] == "base" for r in rows)
    return base + _ordered(r["provider"] for r in rows if r["provider"] != "base")


def _shape_label(r: dict, dtypes: list[str]) -> str:
    return r["shape"] if len(dtypes) == 1 else f"{r['shape']} {r['dtype']}"


def plot_op(op: str, rows: list[dict], png: Path) -> None:
    modes, provs = _modes(rows), _providers(rows)
    dtypes = _ordered(r["dtype"] for r in rows)
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(provs)}
    n_shapes = max(len(_ordered(r["shape"] + r["dtype"] for r in rows if r["mode"] == m)) for m in modes)
    per_shape = 0.16 * len(provs) + 0.2  # inches: room for one bar per provider and a gap
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 2 * (n_shapes * per_shape + 1.2)), squeeze=False)
    for col, mode in enumerate(modes):
        mrows = [r for r in rows if r["mode"] == mode]
        labels = _ordered(_shape_label(r, dtypes) for r in mrows)
        for row_i, (key, title) in enumerate((("x_base", "time / base"), ("x_floor", "time / floor"))):
            ax = axes[row_i][col]
            h = 0.8 / len(provs)
            for i, p in enumerate(provs):
                pts = [(labels.index(_shape_label(r, dtypes)), r[key]) for r in mrows if r["provider"] == p and r[key]]
                if not pts:
                    continue
                ys = [y + (i - (len(provs) - 1) / 2) * h for y, _ in pts]
                vals = [v for _, v in pts]
                ax.barh(ys, vals, height=h, color=colors[p], label=p)
                for y, v in zip(ys, vals):
                    ax.text(v, y, f" {v:.2f}", va="center", fontsize=6)
            ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.invert_yaxis()  # first-measured shape (the op's target) at the top
            ax.set_title(f"{mode}: {title}", fontsize=9)
            ax.margins(x=0.15)
            ax.tick_params(axis="x", labelsize=7)
    axes[0][0].legend(fontsize=7, loc="lower right")
    first = rows[0]
    device = "CPU timings (torch.utils.benchmark, 1 thread)" if first["device"] == "cpu" else first["device"]
    fig.suptitle(f"{op}: {device}; torch {first['torch']}, triton {first['triton']}, commit {first['commit']}, "
                 f"latest run {max(r['timestamp'] for r in rows)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_table(op: str, device: str, rows: list[dict]) -> None:
    provs = _providers(rows)
    print(f"\n{op} on {device} (latest rows; cell = x base / x floor)")
    print(f"{'mode':<8} {'shape':<32} {'dtype':<5} " + " ".join(f"{p:>13}" for p in provs))
    for mode in _modes(rows):
        mrows = [r for r in rows if r["mode"] == mode]
        for shape, dtype in _ordered((r["shape"], r["dtype"]) for r in mrows):
            cells = []
            for p in provs:
                r = next((r for r in mrows if (r["provider"], r["shape"], r["dtype"]) == (p, shape, dtype)), None)
                fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
                cells.append("" if r is None else f"{fmt(r['x_base'])}/{fmt(r['x_floor'])}")
            print(f"{mode:<8} {shape:<32} {dtype:<5} " + " ".join(f"{c:>13}" for c in cells))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", type=Path, default=RESULTS_DIR,
                    help=f"results root holding <device>/<op>.csv (default {RESULTS_DIR})")
    ap.add_argument("--table", action="store_true", help="print the latest numbers as a text table")
    ap.add_argument("--no-plot", action="store_true", help="draw nothing (with --table: text only)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    found = False
    for device_dir in sorted(d for d in args.results.iterdir() if d.is_dir()) if args.results.is_dir() else []:
        floors = read_floors(device_dir)
        for csv_path in sorted(device_dir.glob("*.csv")):
            if csv_header(csv_path) != COLUMNS:
                continue
            rows = latest_rows(csv_path, floors)
            if not rows:
                continue
            found = True
            op = csv_path.stem
            if args.table:
                print_table(op, device_dir.name, rows)
            if not args.no_plot:
                png = csv_path.with_suffix(".png")
                plot_op(op, rows, png)
                print(f"plot: {png}")
    if not found:
        print(f"no benchmark CSVs under {args.results}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
