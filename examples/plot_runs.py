"""Plot log10 κ of several runs: python examples/plot_runs.py out/*/kappa.csv --out kappa.png"""

import argparse
from pathlib import Path

from orthofx.monitor import load_records, plot

p = argparse.ArgumentParser()
p.add_argument("csv", nargs="+")
p.add_argument("--out", default="kappa.png")
a = p.parse_args()
runs = {}
for f in a.csv:
    recs = load_records(f)
    runs[recs[0]["run"] if recs else Path(f).parent.name] = recs
plot(runs, a.out)
print(a.out)
