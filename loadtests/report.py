"""Print a load report and plot it: latency CDFs, throughput vs load, tokens per replica."""

from __future__ import annotations

from pathlib import Path

MODE_COLORS = {"auto": "tab:green", "slow": "tab:red", "fast": "tab:blue"}


def _f(v, digits: int = 3, suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{suffix}"


def format_report(report: dict) -> str:
    lines = []
    name = report.get("name") or "load test"
    cfg = report["config"]
    lines.append(f"# {name}: {report['model']} at {cfg['url']}, {cfg['pattern']} loop, {cfg['num_requests']} requests per run")
    for entry in report["levels"]:
        level = entry[report["level_name"]]
        lines.append(f"\n## {report['level_name']} = {level:g}")
        lines.append("| mode | requests | errors | accuracy | mean tokens | p50 e2e s | p99 e2e s | p50 TTFT s | p50 TPOT ms "
                     "| req/s | tok/s | goodput req/s |")
        lines.append("| --- " * 12 + "|")
        for mode, s in entry["summaries"].items():
            lines.append(f"| {mode} | {s['requests']} | {s['errors']} | {_f(s['accuracy'])} | {_f(s['mean_tokens'], 1)} "
                         f"| {_f(s['e2e_s']['p50'])} | {_f(s['e2e_s']['p99'])} | {_f(s['ttft_s']['p50'])} "
                         f"| {_f(None if s['tpot_s']['p50'] is None else 1000 * s['tpot_s']['p50'], 2)} "
                         f"| {_f(s['throughput_rps'])} | {_f(s['token_throughput_tps'], 1)} | {_f(s['goodput_rps'])} |")
        for mode, r in entry.get("ratios_vs_slow", {}).items():
            saved = entry["tokens_saved_vs_slow"][mode]
            lines.append(f"{mode} / slow: tokens {_f(r['tokens'])} ({_f(r['token_reduction'], 2)}x fewer, "
                         f"{_f(None if saved['saved_fraction'] is None else 100 * saved['saved_fraction'], 1)}% saved on "
                         f"{saved['matched']} matched questions), p50 e2e {_f(r['p50_e2e'])}, p99 e2e {_f(r['p99_e2e'])}, "
                         f"throughput {_f(r['throughput'])}, goodput {_f(r['goodput'])}, accuracy {_f(r['accuracy_points'], 1)} points")
        for mode, s in entry["summaries"].items():
            if s["errors"]:
                lines.append(f"{mode} errors by status: {s['errors_by_status']}")
            for route, reps in s["replicas"].items():
                if len(reps["by_replica"]) > 1:
                    b, t = reps["predicted_token_balance"], reps["token_balance"]
                    lines.append(f"{mode}: {route} pool over {b['replicas']} replicas: predicted-token imbalance "
                                 f"{_f(100 * b['imbalance'], 1)}% (max/mean - 1), generated-token imbalance {_f(100 * t['imbalance'], 1)}%")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    first = report["levels"][0]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, metric, title in ((axes[0, 0], "e2e", "end-to-end latency"), (axes[0, 1], "ttft", "time to first token")):
        for mode, recs in first["records"].items():
            vals = np.sort([r[metric] for r in recs if r["status"] == "ok" and r[metric] is not None])
            if len(vals):
                ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post", label=mode, color=MODE_COLORS.get(mode))
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF ({report['level_name']} {first[report['level_name']]:g})")
        ax.grid(alpha=0.3)
        ax.legend()

    ax = axes[1, 0]
    levels = [e[report["level_name"]] for e in report["levels"]]
    modes = list(first["summaries"])
    if len(levels) == 1:  # one load level: throughput and goodput side by side per mode
        x = np.arange(len(modes))
        colors = [MODE_COLORS.get(m, "gray") for m in modes]
        ax.bar(x - 0.2, [first["summaries"][m]["throughput_rps"] or 0 for m in modes], 0.4, color=colors, label="throughput")
        ax.bar(x + 0.2, [first["summaries"][m]["goodput_rps"] or 0 for m in modes], 0.4, color=colors, alpha=0.45, label="goodput")
        ax.set_xticks(x, modes)
        ax.set_title(f"throughput and goodput ({report['level_name']} {levels[0]:g})")
    else:
        for mode in modes:
            ax.plot(levels, [e["summaries"][mode]["throughput_rps"] or 0 for e in report["levels"]], "o-", label=f"{mode} throughput",
                    color=MODE_COLORS.get(mode))
            ax.plot(levels, [e["summaries"][mode]["goodput_rps"] or 0 for e in report["levels"]], "x--", label=f"{mode} goodput",
                    color=MODE_COLORS.get(mode), alpha=0.6)
        ax.set_xlabel(report["level_name"])
        ax.set_title("throughput and goodput vs load")
    ax.set_ylabel("requests / s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    bars, labels, colors = [], [], []
    for mode, s in first["summaries"].items():
        for route, reps in s["replicas"].items():
            for i, (rep, v) in enumerate(sorted(reps["by_replica"].items())):
                bars.append((v["tokens"], v["predicted_tokens"]))
                labels.append(f"{mode}\n{route} #{i + 1}")
                colors.append(MODE_COLORS.get(mode, "gray"))
    if bars:
        x = np.arange(len(bars))
        ax.bar(x - 0.2, [b[0] for b in bars], 0.4, color=colors, label="generated tokens")
        ax.bar(x + 0.2, [b[1] for b in bars], 0.4, color=colors, alpha=0.45, label="predicted tokens")
        ax.set_xticks(x, labels, fontsize=7)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no replica ids in the responses\n(not a kvswitch server)", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("tokens per replica")
    ax.set_ylabel("tokens")
    fig.suptitle(f"{report.get('name') or 'load test'}: {report['model']}, {report['config']['pattern']} loop")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
