"""Tables of the diagnosis runs: python summ.py FILE.json [FILE.json ...] (pools the rows)."""

import json
import sys

from diagnose import summarize

rows = [r for f in sys.argv[1:] for r in json.load(open(f))["rows"]]
summarize(rows)
