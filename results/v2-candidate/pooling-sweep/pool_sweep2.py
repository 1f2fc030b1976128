"""Dev-only: does calibrating on all 2000 calibration questions help the KV probe against MiniLM?
Labels: the first 1000 from the calibration report; the other 1000 from fast-mode generation only
(0 = fast right in < 69 tokens, 75 otherwise: slow is right on 99.3% of calibration questions)."""
import json, sys
from pathlib import Path
import torch
from serve_app.core.grading import get_grader
from serve_app.core.kv_features import PoolingConfig
from serve_app.offline.calibrate import split_questions, _fit_head, minilm_features
from serve_app.offline.common import setup
from serve_app.offline.metrics import auroc

sys.path.insert(0, str(Path(__file__).parent))
from pool_sweep import MODEL, cfg, dev_ok, fast_enough, pooled, tails  # noqa: E402  (one prefill per set, poolings from its tail)

cal = json.load(open("results/v2-candidate/probe1/calibration.json"))
CANDS = [dict(last_tokens=4, last_layers=4), dict(last_tokens=4, last_layers=1, l2=True), dict(last_tokens=8, last_layers=2, l2=True),
         dict(last_tokens=32, last_layers=4), dict(last_tokens=16, last_layers=4, l2=True), dict(last_tokens=64, last_layers=4)]
CANDS += [json.loads(s) for s in sys.argv[2:]]
results = []
with setup(MODEL, "data/calib-2000-seed31337.jsonl", None, min_rows=0) as cexp, setup(MODEL, "data/dev-mix70-600-seed5050.jsonl", None, min_rows=0) as dexp:
    rows = cexp.rows
    qs = [r["question"] for r in rows]
    fast = cexp.run(cexp.requests(mode="fast", max_new_tokens=1792)[1000:], 64, desc="fast")
    g = get_grader("number")
    y = torch.tensor(cal["labels"] + [0.0 if g.correct(r.reply, row["answer"]) and r.tokens < 69 else 75.0 for r, row in zip(fast, rows[1000:])])
    tr, va = split_questions(qs, 0.25, 0)
    ct, dt = tails(cexp), tails(dexp)
    xm = minilm_features(qs); xdm = minilm_features([r["question"] for r in dexp.rows])
    feats = [("minilm", xm, xdm)] + [(PoolingConfig(**c), None, None) for c in CANDS]
    for name, x, xd in feats:
        if x is None:
            x, xd = pooled(ct, name), pooled(dt, name)
        reg, m = _fit_head("kv", x, y, tr, va, cfg, fast_enough)
        with torch.no_grad():
            d = reg(xd).clamp(0, 100).squeeze(-1).tolist()
        row = {"pooling": name if isinstance(name, str) else name.model_dump(), "val_auroc": round(m["val_auroc"], 4), "dev_auroc": round(auroc([-v for v in d], dev_ok), 4)}
        print(json.dumps(row), flush=True); results.append(row)
        json.dump(results, open(sys.argv[1], "w"), indent=1)
