"""Print a compare.json as one line per method and reduction (for notes and the README).

    .venv/bin/python benchmarks/summarize_compare.py runs/quality_lenet5/compare/compare.json
"""
import json
import sys

data = json.load(open(sys.argv[1]))
print(f"{data['name']}: unpruned {data['base']['acc']:.2f}%")
for r in data["rows"]:
    if r.get("error"):
        print(f"{r['method']:<13} {1 - r['keep_ratio']:.2f}  error: {r['error']}")
        continue
    print(f"{r['method']:<13} {1 - r['keep_ratio']:.2f}  acc before {r['acc_before_retrain']:6.2f}  after {r['acc']:6.2f} "
          f"({r['acc_change']:+.2f})  FLOPs kept {r['achieved_keep']:.4f} (target {r['keep_ratio']})  "
          f"params removed {r['params_removed_pct']:.1f}%")
