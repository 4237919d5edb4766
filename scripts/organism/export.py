"""Export every run record: docs/organism/runs.json (settings, steps, minutes, every measurement),
docs/organism/blocks.csv (final per-block rows) and a markdown per-block table per run (stdout)."""

import csv
import glob
import json
import os
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "/work/wt/organism/docs/organism"
os.makedirs(OUT, exist_ok=True)
records = []
for path in sorted(glob.glob("/work/scratch/organism/runs/*/record.json")):
    r = json.load(open(path))
    records.append({k: r[k] for k in ("args", "params", "steps", "train_minutes", "wall_minutes", "s_per_step", "history")
                    if k in r} | {"stopped_by_time": r.get("stopped_by_time", False)})
json.dump(records, open(f"{OUT}/runs.json", "w"), indent=0)
cols = ["block", "outlier_frac", "max_over_median", "p99_over_median", "outlier_background_share", "patch_background_share",
        "outlier_neighbour_cosine", "patch_neighbour_cosine", "outlier_channel_concentration", "patch_channel_concentration",
        "outlier_attention_lift_next", "register_norm_mean_over_median", "register_norm_max_over_median", "cls_norm_over_median",
        "prefix_attention_lift", "top_patch_attention_lift", "top_patch_background", "top_patch_entering_norm_over_median"]
with open(f"{OUT}/blocks.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "steps", "train_minutes", "val_acc", "lost_corloc", *cols])
    for r in records:
        last = r["history"][-1]
        for b in last["blocks"]:
            w.writerow([r["args"]["name"], last["step"], round(last["train_minutes"], 2), round(last["val_acc"], 4),
                        round(last["lost_corloc"], 4), *[("" if b.get(c) is None else round(b[c], 4)) for c in cols]])


def fmt(v, p=2):
    return "-" if v is None else f"{v:.{p}f}"


for r in records:
    last = r["history"][-1]
    print(f"\n**{r['args']['name']}**: {last['step']} steps, {r['train_minutes']:.1f} train min "
          f"({r['s_per_step']:.3f} s/step), val acc {last['val_acc']:.3f}, LOST CorLoc {last['lost_corloc']:.3f}\n")
    print("| block | outliers % | max/med | bg share (all) | nbr cos (all) | chan conc (others) | lift next | reg/med | CLS/med | top-attended patch: lift, bg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b in last["blocks"]:
        print(f"| {b['block']} | {100 * b['outlier_frac']:.2f} | {b['max_over_median']:.1f} | "
              f"{fmt(b.get('outlier_background_share'))} ({b['patch_background_share']:.2f}) | "
              f"{fmt(b.get('outlier_neighbour_cosine'))} ({b['patch_neighbour_cosine']:.2f}) | "
              f"{fmt(b.get('outlier_channel_concentration'))} ({fmt(b.get('patch_channel_concentration'))}) | "
              f"{fmt(b.get('outlier_attention_lift_next'), 1)} | {fmt(b.get('register_norm_mean_over_median'), 1)} | "
              f"{fmt(b.get('cls_norm_over_median'), 1)} | {b['top_patch_attention_lift']:.1f}, {fmt(b.get('top_patch_background'))} |")


def criterion_hits(r):
    """(step, block, frac, bg, lift) of every measurement meeting the R = 0 criterion's letter."""
    hits = []
    for h in r["history"]:
        for b in h["blocks"]:
            lift = b.get("outlier_attention_lift_next")
            if b["outlier_frac"] >= 0.01 and (b.get("outlier_background_share") or 0) >= 0.8 and lift is not None and lift >= 3:
                hits.append((h["step"], b["block"], round(100 * b["outlier_frac"], 2), round(b["outlier_background_share"], 2), round(lift, 1)))
    return hits


print("\n\nSUMMARY\n")
print("| run | steps | train min | s/step | val acc | block with most outliers: % (max/med) | bg share (all) | lift next | chan conc | max prefix lift (block) | max top-patch lift | LOST | criterion-1 hits (step, block, %, bg, lift) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in records:
    last = r["history"][-1]
    bs = last["blocks"]
    best = max(bs, key=lambda b: (b["outlier_frac"], b["max_over_median"]))
    pl = [(b.get("prefix_attention_lift"), b["block"]) for b in bs if b.get("prefix_attention_lift") is not None]
    plx = max(pl) if pl else None
    print(f"| {r['args']['name']} | {last['step']} | {r['train_minutes']:.1f} | {r['s_per_step']:.3f} | {last['val_acc']:.3f} | "
          f"b{best['block']}: {100 * best['outlier_frac']:.2f} ({best['max_over_median']:.1f}) | "
          f"{fmt(best.get('outlier_background_share'))} ({best['patch_background_share']:.2f}) | {fmt(best.get('outlier_attention_lift_next'), 1)} | "
          f"{fmt(best.get('outlier_channel_concentration'))} | {'-' if plx is None else f'{plx[0]:.1f} (b{plx[1]})'} | "
          f"{max(b['top_patch_attention_lift'] for b in bs):.1f} | {last['lost_corloc']:.3f} | {criterion_hits(r) or '-'} |")
