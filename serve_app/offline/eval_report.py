"""``kvswitch eval``'s report on the terminal and as a PNG (``serve_app.offline.evaluate`` builds it)."""

from __future__ import annotations

import sys
from pathlib import Path

from serve_app.core.policy import OnlineConfig, unreachable_switches
from serve_app.offline.metrics import format_coe_table


def print_report(report: dict) -> None:
    for name, pol in report["policies"].items():
        print(f"\npolicy {name}: accuracy {pol['accuracy']:.3f}  mean tokens {pol['mean_tokens']:.1f}  "
              f"ended with EOS {pol['finished_fraction']:.3f}  (n={pol['n']})")
        print(f"{'operators':>9} {'n':>5} {'accuracy':>9} {'mean_tokens':>12}")
        for k, cell in pol["by_operators"].items():
            print(f"{k:>9} {cell['n']:>5} {cell['accuracy']:>9.3f} {cell['mean_tokens']:>12.1f}")
    print(f"\n{'policy':>15} {'accuracy':>9} {'tokens':>8} {'vs slow':>8} {'oracle eff':>11} {'fast %':>7} {'switches':>9}")
    for name, pol in report["policies"].items():
        red = pol.get("token_reduction_vs_slow")
        eff = pol.get("oracle_efficiency")
        sw = pol.get("switches", {}).get("total")
        print(f"{name:>15} {pol['accuracy']:>9.3f} {pol['mean_tokens']:>8.1f} "
              f"{'' if red is None else f'{red:.2f}x':>8} {'' if eff is None else f'{eff:.1%}':>11} "
              f"{pol['fast_fraction']:>7.1%} {'' if sw is None else sw:>9}")
    for name, pol in report["policies"].items():
        if "mean_probe_tokens" in pol:
            print(f"{name}: {pol['exits']}/{pol['n']} thoughts closed early; side branches {pol['mean_probe_tokens']:.1f} tokens per "
                  f"reply, {pol['mean_tokens_with_probes']:.1f} tokens with them")
    if "sweep" in report:
        from serve_app.offline.sweep import format_matched

        print("\n" + format_matched(report["sweep"]))
    if report.get("knobs_from"):
        from serve_app.offline.sweep import chosen_table, format_chosen

        print("\n" + format_chosen(chosen_table(report)))
    if report.get("probe_auroc"):
        print("\nprobe AUROC of 'fast is enough' on this set: "
              + ", ".join(f"{k} {v:.3f}" for k, v in report["probe_auroc"].items()))
    for mode, cell in report.get("coe", {}).items():
        print(f"\nanswer-correctness scores, {mode} mode ({cell['n_correct']}/{cell['n']} correct; 'correct' positive)")
        print(format_coe_table(cell["table"]))
    for name, pol in report["policies"].items():
        if "self_correction" in pol:
            print(f"\nself-correction, {name} replies (first-pass result vs final answer)")
            print(format_self_correction(pol["self_correction"]))
    if report.get("unavailable"):
        na = report["unavailable"]
        print(f"\nnot reported on the {report.get('engine')} engine ({na['why']}): "
              + ", ".join(x for k in ("policies", "probe_auroc", "coe") for x in na[k]))


def format_self_correction(table: dict) -> str:
    closes = "closed_wrong" in table["all"]
    head = f"{'operators':>9} {'n':>5} {'first wrong':>12} {'-> fixed':>9} {'first right':>12} {'-> kept':>8}"
    rows = [head + (f" {'closed after wrong':>19} {'closed after right':>19}" if closes else "")]
    for k, c in {**table["by_operators"], "all": table["all"]}.items():
        fixed = "" if c["fixed_fraction"] is None else f"{c['fixed_fraction']:.3f}"
        kept = "" if c["kept_fraction"] is None else f"{c['kept_fraction']:.3f}"
        row = f"{k:>9} {c['n']:>5} {c['first_wrong']:>12} {fixed:>9} {c['first_right']:>12} {kept:>8}"
        rows.append(row + (f" {c['closed_wrong']:>19} {c['closed_right']:>19}" if closes else ""))
    if closes:
        rows.append(f"thoughts closed before a first pass was stated: {table['all']['closed_before_first_pass']}")
    return "\n".join(rows)


def plot_report(report: dict, path: str | Path) -> None:
    """Accuracy vs mean generated tokens (one point per policy), and accuracy / tokens per
    operator count (one line per policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_pol, ax_acc, ax_tok) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, pol in report["policies"].items():
        ax_pol.scatter(pol["mean_tokens"], pol["accuracy"], s=40)
        ax_pol.annotate(name, (pol["mean_tokens"], pol["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ks = [int(k) for k in pol["by_operators"]]
        ax_acc.plot(ks, [c["accuracy"] for c in pol["by_operators"].values()], marker="o", label=name)
        ax_tok.plot(ks, [c["mean_tokens"] for c in pol["by_operators"].values()], marker="o", label=name)
    ax_pol.set(xlabel="mean generated tokens", ylabel="accuracy", title="Policies: accuracy vs tokens")
    ax_acc.set(xlabel="operators", ylabel="accuracy", ylim=(0, 1.02), title="Accuracy by difficulty")
    ax_tok.set(xlabel="operators", ylabel="mean generated tokens", yscale="log", title="Generated tokens")
    for ax in (ax_pol, ax_acc, ax_tok):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if "sweep" in report:
        from serve_app.offline.sweep import chosen_table, plot_frontier

        path = Path(path)
        plot_frontier(report["sweep"], path.with_name(f"{path.stem}-frontier.png"), title=f"Accuracy / tokens frontier: {Path(report['dataset']).name}",
                      chosen=chosen_table(report) if report.get("knobs_from") else None)


def warn_unreachable(online: OnlineConfig | None, policies: list[str]) -> list[str]:
    """kv-online thresholds that can never fire (``unreachable_switches``), said on stderr and returned for the report."""
    notes = unreachable_switches(online) if online is not None and "kv-online" in policies else []
    for note in notes:
        print(f"warning: kv-online with tau {online.tau:g}, delta {online.delta:g}: {note}", file=sys.stderr)
    return notes
