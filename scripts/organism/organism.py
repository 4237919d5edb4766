"""Organism search (issue 18; docs/organism.md): train a small timm ViT (with or without CLS, R registers),
measure artifacts per block.

python scripts/organism/organism.py --name NAME ... ; writes --out/NAME/{record.json,model.pt}
(default runs/organism_scripts/)
Measurement (every --eval_every steps and at the end) on fixed held-out val scenes with masks, with
regablate.artifacts' functions: per block b (output of block b, pre-norm):
  outlier_frac (> 4x the block's median patch norm), max/median, background share of the outliers,
  input neighbour cosine (patch embedding) of outliers vs all, channel concentration outliers vs others,
  attention lift at block b+1 of block b's outliers (share of attention from non-outlier queries,
  head mean, over the uniform share), register/CLS norms and the attention share they receive.
LOST CorLoc on the last block's patch keys (regablate.probe.lost) against the largest object's box.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.dirname(__file__))
from scenes import build

from regablate.artifacts import stats as A
from regablate.probe.lost import corloc, lost_boxes

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False)
    a = p.add_argument
    a("--name", required=True)
    a("--seed", type=int, default=0)
    a("--img", type=int, default=32)
    a("--patch", type=int, default=4)
    a("--dim", type=int, default=96)
    a("--depth", type=int, default=4)
    a("--heads", type=int, default=3)
    a("--mlp_ratio", type=float, default=4.0)
    a("--cls", type=int, default=1, help="1: CLS token; 0: none")
    a("--R", type=int, default=0)
    a("--pool", default="token", help="token (CLS) | avg (patches, per-token norm first)")
    a("--objective", default="global", help="global (pooled head) | dense (every patch predicts the label) | both")
    a("--label", default="largest", help="largest | count | presence | parity (count odd or even; needs min_objects 1)")
    a("--scenes", default="regablate", help="regablate | many")
    a("--K", type=int, default=10)
    a("--min_objects", type=int, default=1)
    a("--max_objects", type=int, default=3)
    a("--rmin", type=float, default=0.06)
    a("--rmax", type=float, default=0.12)
    a("--train_size", type=int, default=40000)
    a("--opt", default="adamw")
    a("--lr", type=float, default=2e-3)
    a("--wd", type=float, default=0.05)
    a("--beta2", type=float, default=0.999)
    a("--warmup", type=int, default=100)
    a("--schedule", default="cosine", help="cosine | const")
    a("--steps", type=int, default=2000)
    a("--batch", type=int, default=64)
    a("--init_values", type=float, default=0.0, help="LayerScale init (0: off)")
    a("--reg_std", type=float, default=0.02, help="register init std (timm: 1e-6)")
    a("--eval_every", type=int, default=250)
    a("--max_minutes", type=float, default=10.0)
    a("--threads", type=int, default=2)
    a("--out", default="runs/organism_scripts", help="parent folder of the run folder NAME")
    return p.parse_args()


def make_model(args) -> VisionTransformer:
    model = VisionTransformer(
        img_size=args.img,
        patch_size=args.patch,
        embed_dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        class_token=bool(args.cls),
        reg_tokens=args.R,
        no_embed_class=True,
        global_pool="token" if args.pool == "token" else "avg",
        fc_norm=False,
        num_classes=0,
        init_values=args.init_values or None,
    )
    if args.R:
        with torch.no_grad():
            model.reg_token.normal_(std=args.reg_std)
    return model


def targets_of(data, label: str, index) -> torch.Tensor:
    if label == "presence":
        return torch.from_numpy(data["presence"][index]).float()
    if label == "parity":  # is the number of objects odd? (not a linear function of pooled local features)
        return torch.from_numpy((data["count"][index] + 1) % 2)
    return torch.from_numpy(data[label][index])


def num_outputs(args) -> int:
    if args.label == "count":
        return args.max_objects - args.min_objects + 1
    if args.label == "parity":
        return 2
    return args.K


def to_images(u8: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(u8).float() / 255.0 - MEAN) / STD


def head_loss(head, tokens, target, args, prefix: int):
    """Loss and (global) logits; tokens are the final (normed) tokens."""
    patches = tokens[:, prefix:]
    pooled = tokens[:, 0] if args.pool == "token" else patches.mean(1)
    losses = []
    logits = head(pooled)
    lossf = (lambda z, y: F.binary_cross_entropy_with_logits(z, y)) if args.label == "presence" else F.cross_entropy
    if args.objective in ("global", "both"):
        losses.append(lossf(logits, target))
    if args.objective in ("dense", "both"):
        dense = head(patches)  # (B, N, C)
        b, n, c = dense.shape
        y = target[:, None].expand(b, n, *target.shape[1:]).reshape(b * n, *target.shape[1:])
        losses.append(lossf(dense.reshape(b * n, c), y))
        if args.objective == "dense":
            logits = dense.mean(1)
    return sum(losses), logits


def accuracy(logits, target, label) -> float:
    if label == "presence":
        return ((logits > 0).float() == target).all(-1).float().mean().item()
    return (logits.argmax(-1) == target).float().mean().item()


@torch.no_grad()
def measure(model: VisionTransformer, images, masks, boxes, threshold=A.Threshold()) -> dict:
    model.eval()
    prefix = model.num_prefix_tokens
    has_cls = model.cls_token is not None
    R = model.num_reg_tokens
    depth = len(model.blocks)
    outs, atts, keys = {}, {}, {}
    hooks = []
    emb = {}
    hooks.append(model.patch_embed.register_forward_hook(lambda m, i, o: emb.__setitem__("e", o.detach())))
    for b, blk in enumerate(model.blocks):
        blk.attn.fused_attn = False
        hooks.append(blk.register_forward_hook(lambda m, i, o, b=b: outs.__setitem__(b, o.detach())))
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o, b=b: atts.__setitem__(b, o.detach())))
    last_qkv = model.blocks[-1].attn.qkv
    hooks.append(last_qkv.register_forward_hook(lambda m, i, o: keys.__setitem__("k", o.detach())))
    model.forward_features(images)
    for h in hooks:
        h.remove()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    grid = tuple(model.patch_embed.grid_size)
    background = A.background_patches(masks, grid)
    cosine = A.neighbour_cosine(emb["e"].flatten(1, 2) if emb["e"].dim() == 4 else emb["e"], grid)
    per_block = []
    for b in range(depth):
        tokens = outs[b]
        norms = A.token_norms(tokens)
        pn = norms[:, prefix:]
        median = pn.median()
        mask = pn > threshold.value * median
        row = {
            "block": b,
            "outlier_frac": mask.float().mean().item(),
            "max_over_median": (pn.max() / median).item(),
            "patch_norm_median": median.item(),
            "p99_over_median": (torch.quantile(pn.flatten(), 0.99) / median).item(),
            "patch_background_share": background.float().mean().item(),
            "patch_neighbour_cosine": cosine.mean().item(),
        }
        if R:
            rn = norms[:, int(has_cls) : prefix]
            row["register_norm_mean_over_median"] = (rn.mean() / median).item()
            row["register_norm_max_over_median"] = (rn.max() / median).item()
            if R > 1:  # do the registers differ? mean pairwise cosine of their outputs
                reg = F.normalize(tokens[:, int(has_cls) : prefix].float(), dim=-1)
                cos = reg @ reg.transpose(1, 2)
                row["register_pairwise_cosine"] = ((cos.sum((1, 2)) - R) / (R * (R - 1))).mean().item()
        if has_cls:
            row["cls_norm_over_median"] = (norms[:, 0].mean() / median).item()
        if (~mask).any():
            row["patch_channel_concentration"] = A.channel_concentration(tokens[:, prefix:][~mask]).mean().item()
        if mask.any():
            row["outlier_background_share"] = background[mask].float().mean().item()
            row["outlier_neighbour_cosine"] = cosine[mask].mean().item()
            row["outlier_channel_concentration"] = A.channel_concentration(tokens[:, prefix:][mask]).mean().item()
            if b + 1 < depth:  # sinks: attention these tokens draw in the next block
                keys_mask = F.pad(mask, (prefix, 0))
                share = A.attention_received(atts[b + 1], keys_mask)
                row["outlier_attention_share_next"] = share
                row["outlier_attention_lift_next"] = share / (
                    keys_mask.float().sum(-1).mean().item() / keys_mask.shape[1]
                )
        # attention that prefix tokens (CLS, registers) draw in this block, from patch queries, as a lift
        att = atts[b].float().mean(1)  # (B, T, T)
        T = att.shape[-1]
        if prefix:
            to_prefix = att[:, prefix:, :prefix].sum(-1).mean().item()
            row["prefix_attention_share"] = to_prefix
            row["prefix_attention_lift"] = to_prefix / (prefix / T)
        # the top-attended patch per image: its share of attention (sink strength without thresholds)
        received = att[:, prefix:, prefix:].mean(1)  # (B, N): mean attention each patch gets from patch queries
        row["top_patch_attention_lift"] = (received.max(-1).values * T).mean().item()
        top = received.argmax(-1)  # the most attended patch of each image (attention in this block)
        rows_ = torch.arange(len(top))
        row["top_patch_background"] = background[rows_, top].float().mean().item()
        entering = (
            A.token_norms(outs[b - 1][:, prefix:])
            if b
            else A.token_norms(emb["e"].flatten(1, 2) if emb["e"].dim() == 4 else emb["e"])
        )
        row["top_patch_entering_norm_over_median"] = (entering[rows_, top] / entering.median()).mean().item()
        per_block.append(row)
    # LOST on last-block keys of the patches
    width = keys["k"].shape[-1] // 3
    k = keys["k"][:, prefix:, width : 2 * width]
    boxes_pred = lost_boxes(k.reshape(k.shape[0], *grid, -1), tuple(model.patch_embed.patch_size))
    lost = corloc(boxes_pred, boxes)
    model.train()
    return {"blocks": per_block, "lost_corloc": lost}


def summarize(meas: dict) -> str:
    parts = []
    for r in meas["blocks"]:
        s = f"b{r['block']}:{r['outlier_frac'] * 100:.1f}%/mx{r['max_over_median']:.1f}"
        if "outlier_background_share" in r:
            s += f"/bg{r['outlier_background_share']:.2f}"
        if "outlier_attention_lift_next" in r:
            s += f"/lift{r['outlier_attention_lift_next']:.1f}"
        if "register_norm_mean_over_median" in r:
            s += f"/reg{r['register_norm_mean_over_median']:.1f}"
        if "cls_norm_over_median" in r:
            s += f"/cls{r['cls_norm_over_median']:.1f}"
        s += f"/tpl{r['top_patch_attention_lift']:.1f}"
        if "top_patch_background" in r:
            s += f"/tbg{r['top_patch_background']:.2f}/tn{r['top_patch_entering_norm_over_median']:.1f}"
        if "prefix_attention_lift" in r:
            s += f"/pl{r['prefix_attention_lift']:.1f}"
        parts.append(s)
    return " ".join(parts) + f" LOST {meas['lost_corloc']:.3f}"


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = os.path.join(args.out, args.name)
    os.makedirs(out, exist_ok=True)
    scene = (
        {}
        if args.scenes == "regablate"
        else {"min_objects": args.min_objects, "max_objects": args.max_objects, "rmin": args.rmin, "rmax": args.rmax}
    )
    if args.scenes == "regablate":
        scene = {"max_objects": args.max_objects}
    cache = os.path.join(args.out, "scene_cache")
    train = build(args.scenes, "train", args.train_size, args.img, args.K, cache=cache, **scene)
    val = build(args.scenes, "val", 512, args.img, args.K, cache=cache, **scene)
    mval = slice(0, 256)  # fixed held-out scenes for the artifact measurement
    m_images = to_images(val["images"][mval])
    m_masks = torch.from_numpy(val["masks"][mval].astype(np.int64))
    m_boxes = torch.from_numpy(val["boxes"][mval])
    v_images, v_targets = to_images(val["images"]), targets_of(val, args.label, slice(None))

    model = make_model(args)
    head = torch.nn.Linear(args.dim, num_outputs(args))
    params = list(model.named_parameters()) + [("head." + n, p) for n, p in head.named_parameters()]
    no_decay = {"pos_embed", "cls_token", "reg_token"}
    decay = [p for n, p in params if p.ndim > 1 and n not in no_decay]
    other = [p for n, p in params if not (p.ndim > 1 and n not in no_decay)]
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": other, "weight_decay": 0.0}]
    if args.opt == "adamw":
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2))
    elif args.opt == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    else:
        raise SystemExit(f"unknown --opt {args.opt}")

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        if args.schedule == "const":
            return 1.0
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    rng = np.random.default_rng(args.seed)
    prefix = model.num_prefix_tokens
    record = {"args": vars(args), "history": [], "params": sum(p.numel() for p in model.parameters())}
    start = time.time()
    train_time = 0.0
    step = 0
    losses = []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            model.eval()
            logits = head(
                model.forward_features(v_images)[:, 0]
                if args.pool == "token"
                else model.forward_features(v_images)[:, prefix:].mean(1)
            )
            if args.objective == "dense":
                logits = head(model.forward_features(v_images)[:, prefix:]).mean(1)
            acc = accuracy(logits, v_targets, args.label)
            model.train()
        meas = measure(model, m_images, m_masks, m_boxes)
        entry = {
            "step": step,
            "train_minutes": train_time / 60,
            "val_acc": acc,
            "train_loss": float(np.mean(losses[-50:])) if losses else None,
            **meas,
        }
        record["history"].append(entry)
        print(
            f"[{args.name}] step {step} {train_time / 60:.1f}min loss {entry['train_loss']} acc {acc:.3f} "
            f"| {summarize(meas)}",
            flush=True,
        )

    evaluate(0)
    model.train()
    while step < args.steps:
        t0 = time.time()
        index = rng.integers(0, args.train_size, args.batch)
        images = to_images(train["images"][index])
        flip = torch.from_numpy(rng.random(args.batch) < 0.5)
        images[flip] = images[flip].flip(-1)
        target = targets_of(train, args.label, index)
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_at(step)
        loss, _ = head_loss(head, model.forward_features(images), target, args, prefix)
        if not torch.isfinite(loss):
            print(f"[{args.name}] non-finite loss at step {step}", flush=True)
            record["diverged_at"] = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        train_time += time.time() - t0
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
        if train_time > args.max_minutes * 60:
            if record["history"][-1]["step"] != step:
                evaluate(step)
            record["stopped_by_time"] = True
            break
    record["steps"] = step
    record["train_minutes"] = train_time / 60
    record["wall_minutes"] = (time.time() - start) / 60
    record["s_per_step"] = train_time / max(step, 1)
    record["final"] = record["history"][-1]
    with open(f"{out}/record.json", "w") as f:
        json.dump(record, f, indent=1)
    torch.save({"model": model.state_dict(), "head": head.state_dict(), "args": vars(args)}, f"{out}/model.pt")
    print(
        f"[{args.name}] done: {step} steps, {train_time / 60:.2f} train min, {record['wall_minutes']:.2f} wall min, "
        f"{record['s_per_step']:.3f} s/step",
        flush=True,
    )


if __name__ == "__main__":
    main()
