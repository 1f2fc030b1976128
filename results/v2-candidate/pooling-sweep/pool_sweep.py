"""Dev-only sweep of the v2 probe's prompt pooling: labels from the calibration report (first 1000
calibration questions, same train/val split), extra dev AUROC on dev-mix70 (fast-correct labels from
its eval records). No generation: one prefill per set, every pooling from the kept cache tail."""
import itertools, json, sys, time
import torch
from serve_app.core.kv_features import PoolingConfig, pool_kv, cache_kv
from serve_app.offline.calibrate import split_questions, _fit_head, minilm_features
from serve_app.offline.common import setup, batches
from serve_app.offline.metrics import auroc
from serve_app.offline.probe_train import TrainProbeConfig

MODEL = "models/arith-qwen3-tiny-v2"
TAIL = 64
cal = json.load(open("results/v2-candidate/probe1/calibration.json"))
y = torch.tensor(cal["labels"])
dev = json.load(open("results/v2-candidate/probe1/dev-mix70-tau.json"))
dev_ok = [r["correct"] for r in dev["policies"]["fast"]["records"]]
cfg = TrainProbeConfig()
fast_enough = lambda v: v <= 25

def tails(exp):
    out = []
    groups = batches([len(p) for p in exp.prompt_ids], 64)
    for idx in groups:
        cache, mask, _, _ = exp.engine.prefill([exp.prompt_ids[i] for i in idx])
        k, v = cache_kv(cache)
        out.append((idx, [t[:, :, -TAIL:].clone() for t in k], [t[:, :, -TAIL:].clone() for t in v], mask[:, -TAIL:].clone()))
    return out

def pooled(tl, p):
    n = sum(len(i) for i, *_ in tl)
    x = None
    for idx, k, v, m in tl:
        f = pool_kv(k, v, m, p)
        if x is None:
            x = torch.zeros(n, f.shape[1])
        x[idx] = f
    return x

def grid_from(spec):
    g = []
    for S, tok, part, nl, l2 in itertools.product(*spec):
        g.append(PoolingConfig(last_tokens=S, token=tok, part=part, last_layers=nl, l2=l2))
    return g

GRIDS = {
 "a": [[4, 8, 16, 32, 64], ["sum"], ["kv"], [4, 2, 1], [False, True]],
 "b": [[4, 8, 16, 32, 64], ["mean"], ["kv"], [4, 2, 1], [False, True]],
 "c": [[4, 16, 64], ["sum"], ["k", "v"], [4], [False, True]],
}
def main():
    grid = [p for name in sys.argv[1].split(",") for p in grid_from(GRIDS[name])]  # e.g. a  or  b,c
    out = sys.argv[2]
    results = []
    t0 = time.time()
    with setup(MODEL, "data/calib-2000-seed31337.jsonl", 1000, min_rows=0) as cexp, setup(MODEL, "data/dev-mix70-600-seed5050.jsonl", None, min_rows=0) as dexp:
        qs = [r["question"] for r in cexp.rows]
        tr, va = split_questions(qs, 0.25, 0)
        assert len(dev_ok) == len(dexp.rows)
        ct, dt = tails(cexp), tails(dexp)
        print("prefill", round(time.time() - t0, 1), flush=True)
        if "minilm" in sys.argv[3:]:
            xm = minilm_features(qs); xdm = minilm_features([r["question"] for r in dexp.rows])
            reg, m = _fit_head("minilm", xm, y, tr, va, cfg, fast_enough)
            with torch.no_grad():
                d = reg(xdm).clamp(0, 100).squeeze(-1).tolist()
            ref = {"pooling": "minilm", "val_auroc": m["val_auroc"], "dev_auroc": auroc([-v for v in d], dev_ok)}
            print(json.dumps(ref), flush=True); results.append(ref)
        for p in grid:
            t = time.time()
            x, xd = pooled(ct, p), pooled(dt, p)
            reg, m = _fit_head("kv", x, y, tr, va, cfg, fast_enough)
            with torch.no_grad():
                d = reg(xd).clamp(0, 100).squeeze(-1).tolist()
            row = {"pooling": p.model_dump(), "val_auroc": round(m["val_auroc"], 4), "dev_auroc": round(auroc([-v for v in d], dev_ok), 4), "s": round(time.time() - t, 1)}
            print(json.dumps(row), flush=True); results.append(row)
            json.dump(results, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
