"""Fill docs/organism.md's RESULTS_PLACEHOLDER with the summary and per-run tables (from runs.json)."""

import json
import sys

sys.path.insert(0, "/work/scratch/organism")
from notes import NOTES  # noqa: E402

DOC = "/work/wt/organism/docs/organism.md"
records = json.load(open("/work/wt/organism/docs/organism/runs.json"))
order = list(NOTES)
records.sort(key=lambda r: order.index(r["args"]["name"]) if r["args"]["name"] in order else 99)


def fmt(v, p=2):
    return "-" if v is None else f"{v:.{p}f}"


def settings(a):
    parts = [f"{a['img']} px / patch {a['patch']} ({(a['img'] // a['patch']) ** 2} tokens)", f"width {a['dim']}",
             f"{a['depth']} blocks", f"{a['heads']} heads", "CLS" if a["cls"] else "no CLS", f"pool {a['pool']}",
             f"R = {a['R']}", f"objective {a['objective']}", f"label {a['label']}"]
    if a["scenes"] == "regablate":
        parts.append(f"regablate scenes (1-{a['max_objects']} objects, K {a['K']})")
    else:
        parts.append(f"scattered scenes ({a['min_objects']}-{a['max_objects']} objects, radius {a['rmin']}-{a['rmax']}, K {a['K']})")
    opt = f"{a['opt']} lr {a['lr']:g} wd {a['wd']:g}" + (f" beta2 {a['beta2']}" if a["opt"] == "adamw" and a["beta2"] != 0.999 else "")
    parts += [opt, f"warmup {a['warmup']} then {a['schedule']}", f"batch {a['batch']}"]
    if a["init_values"]:
        parts.append(f"LayerScale {a['init_values']:g}")
    parts += [f"seed {a['seed']}", f"{a['threads']} thread(s)"]
    return ", ".join(parts)


def hits(r):
    out = []
    for h in r["history"]:
        for b in h["blocks"]:
            lift = b.get("outlier_attention_lift_next")
            if b["outlier_frac"] >= 0.01 and (b.get("outlier_background_share") or 0) >= 0.8 and lift is not None and lift >= 3:
                out.append(f"step {h['step']} block {b['block']}: {100 * b['outlier_frac']:.1f} %, {b['outlier_background_share']:.0%} bg, lift {lift:.1f}")
    return "; ".join(out) or "none"


lines = ["## Every run", "",
         "Final measurement of each run (the block with the most outliers). `criterion 1` lists every measurement "
         "(any step, any block) that met the letter of the R = 0 criterion (>= 1 %, >= 80 % background, lift >= 3). "
         "Minutes are training time only (measurements excluded); the machine was shared with other jobs, so s/step "
         "varies up to 9x for the same size: judge compute by steps.", "",
         "| run | steps | train min | s/step | val acc | most outliers: block, % (max/med) | their bg share (all) | lift next | chan conc | max CLS/reg lift (block) | LOST | criterion 1 |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
for r in records:
    last = r["history"][-1]
    bs = last["blocks"]
    best = max(bs, key=lambda b: (b["outlier_frac"], b["max_over_median"]))
    pl = [(b["prefix_attention_lift"], b["block"]) for b in bs if b.get("prefix_attention_lift") is not None]
    plx = f"{max(pl)[0]:.1f} (b{max(pl)[1]})" if pl else "-"
    lines.append(
        f"| {r['args']['name']} | {last['step']} | {r['train_minutes']:.1f} | {r['s_per_step']:.3f} | {last['val_acc']:.3f} | "
        f"b{best['block']}, {100 * best['outlier_frac']:.2f} ({best['max_over_median']:.1f}) | "
        f"{fmt(best.get('outlier_background_share'))} ({best['patch_background_share']:.2f}) | "
        f"{fmt(best.get('outlier_attention_lift_next'), 1)} | {fmt(best.get('outlier_channel_concentration'))} | {plx} | "
        f"{last['lost_corloc']:.3f} | {hits(r)} |")
lines += ["", "val acc: top-1 on 512 validation scenes (presence: all 16 labels right); LOST: CorLoc on 256.", ""]
for r in records:
    a, last = r["args"], r["history"][-1]
    hyp, verdict = NOTES.get(a["name"], ("", ""))
    lines += [f"### {a['name']}", "", f"*Hypothesis.* {hyp}", "", f"*Settings.* {settings(a)}.", "",
              f"*Compute.* {last['step']} steps in {r['train_minutes']:.1f} training minutes ({r['s_per_step']:.3f} s/step), "
              f"{r['wall_minutes']:.1f} wall minutes with measurements; {r['params'] / 1e6:.2f}M parameters.", "",
              "| block | outliers % | max/med | bg share (all) | nbr cos (all) | chan conc (others) | lift next | reg/med | CLS/med | CLS/reg lift | top patch: lift, bg |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in last["blocks"]:
        lines.append(
            f"| {b['block']} | {100 * b['outlier_frac']:.2f} | {b['max_over_median']:.1f} | "
            f"{fmt(b.get('outlier_background_share'))} ({b['patch_background_share']:.2f}) | "
            f"{fmt(b.get('outlier_neighbour_cosine'))} ({b['patch_neighbour_cosine']:.2f}) | "
            f"{fmt(b.get('outlier_channel_concentration'))} ({fmt(b.get('patch_channel_concentration'))}) | "
            f"{fmt(b.get('outlier_attention_lift_next'), 1)} | {fmt(b.get('register_norm_mean_over_median'), 1)} | "
            f"{fmt(b.get('cls_norm_over_median'), 1)} | {fmt(b.get('prefix_attention_lift'), 1)} | "
            f"{b['top_patch_attention_lift']:.1f}, {fmt(b.get('top_patch_background'))} |")
    lines += ["", f"LOST CorLoc {last['lost_corloc']:.3f}; val acc {last['val_acc']:.3f}.", "", f"*Verdict.* {verdict}", ""]

doc = open(DOC).read()
marker_start, marker_end = "<!-- results -->", "<!-- /results -->"
block = marker_start + "\n" + "\n".join(lines) + "\n" + marker_end
if "RESULTS_PLACEHOLDER" in doc:
    doc = doc.replace("RESULTS_PLACEHOLDER", block)
else:
    doc = doc[: doc.index(marker_start)] + block + doc[doc.index(marker_end) + len(marker_end):]
open(DOC, "w").write(doc)
print("ok", len(records), "runs")
