#!/usr/bin/env bash
# "From runs to results" (README): the prison study with the scripted model, offline, from
# factors to the report. Run from the repository root; it writes into ./walkthrough/.
# docs/report.png is the top of walkthrough/report/report.html.
set -euo pipefail
out=walkthrough
mkdir -p "$out"

# 1. factors -> run: 2 x 2 levels of two factors (the others fixed), 5 repetitions each
simulator run experiments/prison.yaml --llm scripted --messages 8 --days 2 \
  --agents guard=1,prisoner=2 --repetitions 5 --plain \
  --factor risks=yes,no --factor guard_personality=good,bad \
  --factor oversight=yes --factor goal=yard_time --factor prisoner_personality=bad

# 2. score: the study's judge scorers, judged by the scripted model (docs/scripted-scorers.yaml)
simulator score prison --scorers docs/scripted-scorers.yaml \
  --scorer goal_achieved --scorer turn_goal_achieved --scorer toxicity

# 3. annotate: a sheet for a person; here a stand-in fills the answer column
simulator annotate export prison --scorer goal_achieved --annotator ann \
  --scorers docs/scripted-scorers.yaml --out "$out/sheet.csv"
python - "$out/sheet.csv" <<'PY'
import csv, hashlib, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="", encoding="utf-8")))
for r in rows:
    r["goal_achieved"] = ["Yes", "No", "NotTried"][hashlib.sha256(r["transcript"].encode()).digest()[0] % 3]
with open(sys.argv[1], "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
PY
simulator annotate import "$out/sheet.csv" --annotator ann

# 4. agreement between the judge and the annotator
simulator agreement prison --scorer goal_achieved --scorers docs/scripted-scorers.yaml

# 5. the report: tables, figures, one HTML page
simulator report prison --by risks --by guard_personality --out "$out/report"
