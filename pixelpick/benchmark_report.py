"""The benchmark's report: a CSV of every run's rows, a markdown summary beside the paper's table, and a plot.

Everything here is a pure function of the rows that `pixelpick.benchmark` writes, so a report can be rebuilt from
its CSV alone (`python -m flows.benchmark --report-only`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pixelpick.benchmark import EXPANSION_PREFIXES, FULL, STAGES  # noqa: E402
from pixelpick.io import atomic_write, write_csv  # noqa: E402

# The paper: DeepLabv3+ MobileNetV2 on CamVid 360x480, margin sampling, mean of 5 runs (mIoU %).
PAPER_CAMVID_MARGIN = {20: 50.8, 40: 53.9, 60: 55.3, 80: 55.2, 100: 55.9}
PAPER_CAMVID_FULL = 58.2

RUN_COLUMNS = ["dataset", "preset", "strategy", "pixels_per_image", "seed", "miou", "round", "arch", "image_size",
               "device", "epochs_per_round", "epochs_round_0"]


def results_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (run, budget): the identifying columns first, then per-class IoU and per-stage seconds."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError("no benchmark results to report: no run has finished yet")
    first = [c for c in RUN_COLUMNS if c in frame]
    rest = [c for c in frame.columns if c not in first]
    budget = frame["pixels_per_image"].where(frame["strategy"] != FULL, np.inf)
    return frame[first + rest].assign(_order=budget).sort_values(["strategy", "_order", "seed"]).drop(
        columns="_order").reset_index(drop=True)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of mIoU (%) per strategy and budget, with the % of full supervision (means over seeds).

    `pct_of_full` divides by the full-supervision model trained as long as the budget's models were (the same
    round, when full supervision ran round by round; else its one model). `pct_of_final_full` divides by the
    longest-trained full-supervision model.
    """
    al = frame[frame["strategy"] != FULL].copy()
    al["budget"] = al["pixels_per_image"].round().astype(int)
    summary = al.groupby(["strategy", "budget"]).agg(
        mean=("miou", "mean"), std=("miou", "std"), count=("miou", "count"), round=("round", "first")).reset_index()
    summary[["mean", "std"]] *= 100
    reference = full_by_round(frame)["mean"]
    if reference.empty:
        summary["pct_of_full"] = summary["pct_of_final_full"] = np.nan
        return summary
    matched = summary["round"].map(reference) if len(reference) > 1 else reference.iloc[0]
    summary["pct_of_full"] = 100 * summary["mean"] / matched
    summary["pct_of_final_full"] = 100 * summary["mean"] / reference.iloc[-1]
    return summary


def full_by_round(frame: pd.DataFrame) -> pd.DataFrame:
    """Full supervision's mIoU (%) mean, std and epochs per round (one row when it trained once)."""
    full = frame[frame["strategy"] == FULL]
    rounds = full["round"].fillna(0).astype(int) if "round" in full else pd.Series(0, index=full.index)
    epochs = full["epochs"] if "epochs" in full else pd.Series(np.nan, index=full.index)
    return pd.DataFrame({"miou": 100 * full["miou"], "epochs": epochs, "round": rounds}).groupby("round").agg(
        mean=("miou", "mean"), std=("miou", "std"), count=("miou", "count"), epochs=("epochs", "max"))


def paired_comparison(frame: pd.DataFrame) -> pd.DataFrame:
    """Each strategy against random selection trained the same way (`random_counterpart`), seed by seed: per
    budget, the mean and std over seeds of (strategy - random) mIoU points, and in how many seeds it wins.
    Seeds share round 0 and the images, so the paired difference removes what the seeds have in common."""
    al = frame[frame["strategy"] != FULL].assign(budget=lambda f: f["pixels_per_image"].round().astype(int))
    table = al.pivot_table(index=["budget", "seed"], columns="strategy", values="miou", aggfunc="mean") * 100
    rows = []
    for strategy in table.columns:
        reference = None if strategy.startswith("random") else random_counterpart(strategy, list(table.columns))
        if reference is None:
            continue
        for budget, diffs in (table[strategy] - table[reference]).groupby(level="budget"):
            diffs = diffs.dropna()
            if len(diffs):
                rows.append({"strategy": strategy, "reference": reference, "budget": budget, "seeds": len(diffs),
                             "mean_diff": diffs.mean(), "std_diff": diffs.std() if len(diffs) > 1 else np.nan,
                             "wins": int((diffs > 0).sum())})
    return pd.DataFrame(rows, columns=["strategy", "reference", "budget", "seeds", "mean_diff", "std_diff", "wins"])


def _paired_table(paired: pd.DataFrame) -> str:
    cells = {f"{row['strategy']} − {row['reference']}": {} for _, row in paired.iterrows()}
    for _, row in paired.iterrows():
        spread = f" ± {row['std_diff']:.1f}" if not np.isnan(row["std_diff"]) else ""
        cells[f"{row['strategy']} − {row['reference']}"][f"{row['budget']} px/img"] = \
            f"{row['mean_diff']:+.1f}{spread} ({row['wins']}/{row['seeds']})"
    return pd.DataFrame(cells).T.fillna("").to_markdown()


def expansion_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of the expansion metrics (labels added per click, precision against the ground truth) per
    strategy and budget; empty when no run expanded its clicks."""
    columns = [c for c in frame.columns if c.startswith(EXPANSION_PREFIXES)]
    al = frame[frame["strategy"] != FULL]
    if not columns or al[columns].isna().all().all():
        return pd.DataFrame()
    al = al.assign(budget=al["pixels_per_image"].round().astype(int))
    return al.groupby(["strategy", "budget"])[columns].mean().dropna(how="all")


def write_report(frame: pd.DataFrame, out_dir: Path, stem: str, command: str = "") -> dict[str, Path]:
    """Write `<stem>.csv`, `<stem>.md` and `<stem>.png` into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "markdown": out_dir / f"{stem}.md", "plot": out_dir / f"{stem}.png"}
    write_csv(frame, paths["csv"])
    summary = summarise(frame)
    atomic_write(paths["plot"], lambda f: f.write(plot_png(frame, summary)))
    text = markdown_report(frame, summary, plot_name=paths["plot"].name, csv_name=paths["csv"].name, command=command)
    atomic_write(paths["markdown"], lambda f: f.write(text.encode()))
    return paths


def markdown_report(frame: pd.DataFrame, summary: pd.DataFrame, plot_name: str, csv_name: str,
                    command: str = "") -> str:
    first = frame.iloc[0]
    full = full_by_round(frame)
    seeds = sorted(frame["seed"].unique())
    round_0 = first.get("epochs_round_0", first["epochs_per_round"])
    epochs = (f"{first['epochs_per_round']} epochs per round" if round_0 == first["epochs_per_round"]
              else f"{int(round_0)} epochs in round 0, then {first['epochs_per_round']} per round")
    lines = [
        f"# Label efficiency on {first['dataset']}: preset `{first['preset']}`",
        "",
        "Generated by `pixelpick.benchmark_report` from the rows in "
        f"[{csv_name}]({csv_name}); do not edit by hand.",
        "",
        f"- Recipe: {first['arch']} at {first['image_size']}, {epochs}, on {first['device']}; seeds "
        f"{', '.join(map(str, seeds))}. Rows are named by strategy and the settings they change from the preset: "
        "`+sp0` without superpixel expansion, `+st0.9` with self-training, `+cb1` class-balanced, `+mc8` MC dropout, "
        "`+ss0.1` sieved superpixels, `+fp0.9` feature-space propagation (`+fr16` within 16 px), `+ep10` 10 "
        "fine-tuning epochs per later round.",
    ]
    if "protocol" in frame and frame["protocol"].notna().any():
        protocol = frame["protocol"].dropna().iloc[0]
        lines.append(f"- Protocol `{protocol}`: " + {
            "tune": "trained on 80% of CamVid train, evaluated on the fixed other 20% (the tuning split); for "
                    "choosing settings, not for reporting.",
            "report": "trained on CamVid train, evaluated on val."}.get(protocol, "custom splits."))
    if len(full):
        last = full.iloc[-1]
        lines.append(f"- Full supervision: {last['mean']:.1f}" + _spread(last)
                     + f" mIoU over {int(last['count'])} run(s)"
                     + (f", trained {int(last['epochs'])} epochs in all" if not np.isnan(last["epochs"]) else "")
                     + (f", round by round like the active-learning runs, each round evaluated (row `{FULL}`)."
                        if len(full) > 1 else "."))
    else:
        lines.append(f"- Full supervision: no run has finished yet (row `{FULL}`), so no share of it is given.")
    if command:
        lines.append(f"- Command: `{command}`")
    bar = "the longest-trained full-supervision model" if len(full) > 1 else "full supervision"
    lines += ["", "## mIoU (%) by labelled pixels per image", "",
              f"Mean ± std over seeds; in brackets, the % of {bar} (the paper's column: the % of its full "
              "supervision)." if len(full) else "Mean ± std over seeds; the paper's in brackets: its % of its full "
              "supervision.", "", _strategy_table(summary, full, "pct_of_final_full"), "",
              "![mIoU against labelled pixels per image](" + plot_name + ")", ""]
    if len(full) > 1:
        lines += ["The same, as % of the full-supervision model trained exactly as long (the same round):", "",
                  _strategy_table(summary, full, "pct_of_full"), ""]
    lines += _verdicts(summary)
    paired = paired_comparison(frame)
    if len(paired):
        lines += ["", "## Paired against random, seed by seed", "",
                  "Mean ± std over seeds of the strategy's mIoU minus that of random selection trained the same way "
                  "(same seed, same round-0 draw), in points; in brackets, the seeds it wins.", "",
                  _paired_table(paired), ""]
    expansion = expansion_summary(frame)
    if len(expansion):
        lines += ["## More supervision per click: labels added and their precision", "",
                  "Mean over seeds, per round: `*_per_click` expanded labels per click, `*_precision` the share of "
                  "them the ground truth agrees with (void pixels left out), `superpixel_sieved_share` the share "
                  "of superpixel expansion the sieve dropped.", "", expansion.round(3).to_markdown(), ""]
    budgets = sorted(summary["budget"].unique())
    for label, budget in (("the smallest", budgets[0]), ("the largest", budgets[-1])):
        lines += ["", f"## IoU (%) per class at {label} budget ({budget} px/img)", "",
                  _per_class_table(frame, budget), ""]
    lines += ["## Where a round spends its time (seconds per round, mean over rounds and seeds)", "",
              "Round 0 has no inference (its pixels are random), and random picks need none. Scoring runs on the "
              "store's writer thread inside the inference wall time, so the round total leaves it out.", "",
              _stage_table(frame), ""]
    return "\n".join(lines)


def _strategy_table(summary: pd.DataFrame, full: pd.DataFrame, share: str) -> str:
    budgets = sorted(summary["budget"].unique())
    table = {
        strategy: {row["budget"]: f"{row['mean']:.1f}{_spread(row)}" + ("" if np.isnan(row[share]) else
                                                                       f" ({row[share]:.0f}%)")
                   for _, row in rows.iterrows()}
        for strategy, rows in summary.groupby("strategy")
    }
    if len(full):
        round_of = summary.groupby("budget")["round"].first()
        table[FULL] = {b: _reference_cell(full.loc[round_of[b]] if len(full) > 1 else full.iloc[0], full, share)
                       for b in budgets}
    paper = {b: f"{PAPER_CAMVID_MARGIN[b]:.1f} ({100 * PAPER_CAMVID_MARGIN[b] / PAPER_CAMVID_FULL:.0f}%)"
             if b in PAPER_CAMVID_MARGIN else "" for b in budgets}
    table["paper: margin, DL-MobileNetV2 360x480"] = paper
    frame = pd.DataFrame(table).T.fillna("")
    frame.columns = [f"{b} px/img" for b in budgets]
    return frame.to_markdown()


def _spread(row: pd.Series) -> str:
    """' ± std' over seeds; nothing for one seed, which has no spread to show."""
    return f" ± {row['std']:.1f}" if row["count"] > 1 else ""


def _reference_cell(row: pd.Series, full: pd.DataFrame, share: str) -> str:
    spread = _spread(row)
    epochs = f", {int(row['epochs'])} ep" if not np.isnan(row["epochs"]) else ""
    percent = 100.0 if share == "pct_of_full" else 100 * row["mean"] / full["mean"].iloc[-1]
    return f"{row['mean']:.1f}{spread} ({percent:.0f}%{epochs})"


def random_counterpart(strategy: str, strategies: Sequence[str]) -> str | None:
    """The random-selection row trained the same way (`random+sp0` for `margin+sp0`), else plain `random`."""
    _, _, variant = strategy.partition("+")
    for candidate in (f"random+{variant}" if variant else "random", "random"):
        if candidate in strategies and candidate != strategy:
            return candidate
    return None


def _verdicts(summary: pd.DataFrame) -> list[str]:
    """Plain statements of the bar: each strategy against random selection trained the same way, and its % of the
    longest-trained full supervision against the paper's % at each budget."""
    by = summary.pivot(index="budget", columns="strategy", values="mean")
    final = summary.pivot(index="budget", columns="strategy", values="pct_of_final_full")
    lines = ["### Against the bar", ""]
    paired = {s: random_counterpart(s, by.columns) for s in by.columns if not s.startswith("random")}
    shared = len(by) > 1 and any(paired.values()) and all(
        by.iloc[0][s] == by.iloc[0][r] for s, r in paired.items() if r is not None)
    if shared:
        lines.append(f"- At {by.index[0]} px/img a strategy and its random counterpart are the same model: the first "
                     "budget's pixels are the same random draw for both (a paired comparison), so selection is "
                     "compared from the second budget on.")
    first = by.index[1] if shared else by.index[0]
    for strategy, reference in paired.items():
        if reference is not None:
            diff = (by[strategy] - by[reference]).dropna().loc[first:]
            wins = int((diff > 0).sum())
            lines.append(f"- {strategy} beats {reference} at {wins} of {len(diff)} budgets from {first} px/img "
                         f"(mIoU points: {', '.join(f'{b}: {d:+.1f}' for b, d in diff.items())}).")
        if not np.isnan(final[strategy]).all():
            met = [b for b in PAPER_CAMVID_MARGIN if b in final.index and not np.isnan(final.loc[b, strategy])
                   and final.loc[b, strategy] >= 100 * PAPER_CAMVID_MARGIN[b] / PAPER_CAMVID_FULL]
            shares = ", ".join(f"{final.loc[b, strategy]:.0f}% at {b}" for b in final.index
                               if not np.isnan(final.loc[b, strategy]))
            lines.append(f"- {strategy} reaches {shares} px/img of the longest-trained full supervision: the paper's "
                         f"share or more at {len(met)} of {len(final.index)} budgets.")
    return lines


def _per_class_table(frame: pd.DataFrame, budget: int) -> str:
    iou_columns = [c for c in frame.columns if c.startswith("iou_")]
    al = frame[frame["strategy"] != FULL]
    chosen = al[al["pixels_per_image"].round() == budget]
    full = frame[frame["strategy"] == FULL]
    if "round" in full and full["round"].notna().any():
        full = full[full["round"] == full["round"].max()].assign(strategy=f"{FULL} (longest-trained)")
    table = pd.concat([chosen, full]).groupby("strategy")[iou_columns].mean().mul(100)
    table.columns = [c.removeprefix("iou_") for c in iou_columns]
    return table.round(1).to_markdown()


def _stage_table(frame: pd.DataFrame) -> str:
    columns = [f"{stage}_s" for stage in STAGES]
    table = frame.groupby("strategy")[columns].mean()
    table.columns = list(STAGES)
    total = table.drop(columns="scoring").sum(axis=1)
    table["round total"] = total
    table["training share"] = (100 * table["training"] / total).round(0).astype(int).astype(str) + "%"
    return table.round(1).to_markdown()


def plot_png(frame: pd.DataFrame, summary: pd.DataFrame) -> bytes:
    """mIoU and % of full supervision against labelled pixels per image, one line per strategy (± std)."""
    import io

    figure, (absolute, relative) = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy, rows in summary.groupby("strategy"):
        rows = rows.sort_values("budget")
        absolute.errorbar(rows["budget"], rows["mean"], yerr=rows["std"].fillna(0), marker="o", capsize=3,
                          label=strategy)
        relative.plot(rows["budget"], rows["pct_of_final_full"], marker="o", label=strategy)
    full = full_by_round(frame)
    if len(full) > 1:
        budgets = summary.groupby("round")["budget"].first()
        absolute.plot(full.index.map(budgets), full["mean"], color="black", linestyle="--", marker="x",
                      label="full supervision, trained as long")
    elif len(full):
        reference = full["mean"].iloc[0]
        absolute.axhline(reference, color="black", linestyle="--", label=f"full supervision ({reference:.1f})")
    paper_budgets = list(PAPER_CAMVID_MARGIN)
    relative.plot(paper_budgets, [100 * v / PAPER_CAMVID_FULL for v in PAPER_CAMVID_MARGIN.values()],
                  color="grey", linestyle=":", marker="s", label="paper: margin (360x480, DL-MobileNetV2)")
    absolute.set(xlabel="labelled pixels per image", ylabel="mIoU (%)", title="mIoU on the evaluation split")
    reference = "the longest-trained full supervision" if len(full) > 1 else "full supervision"
    relative.set(xlabel="labelled pixels per image", ylabel=f"% of {reference}", title=f"% of {reference}")
    for axis in (absolute, relative):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
