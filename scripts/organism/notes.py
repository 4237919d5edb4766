"""Per-run hypothesis and verdict text for docs/organism.md (filled into the per-run sections)."""

NOTES = {
    "S01_cls_largest_r0": (
        "Control: the quickstart task (class of the largest of 1-3 objects, default layout, 88 % background) "
        "with a CLS readout, 6 blocks, AdamW 2e-3 cosine, batch 64: the recipe known to grow nothing.",
        "No outliers (max/median <= 2.2). The task is solved (99 %). The CLS token draws up to 9.6x its uniform "
        "share of patch attention (block 1) at a normal norm: the CLS is already a sink, and needs no high norm.",
    ),
    "S02_nocls_largest_r0": (
        "H1: without a CLS token no token is constant at the input, so a sink must be made out of a patch, "
        "ideally a redundant background one. Same task, mean-patch readout, AdamW 3e-3 constant, wd 0.1.",
        "No outliers; norms flatter than with CLS (max/median 1.4-1.8). Attention concentrates (the most-attended "
        "patch gets 15-23x uniform) but on objects. Only 688 steps (the machine was shared: 0.52 s/step).",
    ),
    "S03_nocls_presence_r0": (
        "H2 + H1: a label that needs aggregation and stays unsolved longer: which of 16 classes are present "
        "(multi-label, 1-4 small scattered objects, 94 % background); class-specific heads are idle in most images, "
        "which is what makes sinks in language models.",
        "No outliers in 463 steps (9 minutes at 1.17 s/step: two threads fighting another job; every later run uses "
        "one thread). Attention on objects (most-attended patch on background in 26-49 % of images, against 94 %).",
    ),
    "S04_nocls_count_r0": (
        "H2 + H1: count 1-6 small scattered objects (16 classes, 94 % background); the base of the later "
        "one-factor variations (S06-S11, S14, S15). 4 blocks, width 96, batch 32.",
        "Block 0 has ~1 % tokens above 4x median, but on foreground (24 % background against 94 %), not redundant "
        "(neighbour cosine 0.23 against 0.87) and not attended (lift 0.0): bright object patches at the embedding. "
        "Count accuracy 57 %: the task stays unsolved, as wanted.",
    ),
    "S05_nocls_dense_presence_r0": (
        "H3: a dense objective, every patch predicts the image's presence vector, so every patch needs the global "
        "answer: a broadcast hub should form.",
        "No outliers in 4,894 steps; the most-attended patch is on an object (lift ~18, background in 32 % of images). "
        "The hub, if any, is the objects themselves.",
    ),
    "S06_nocls_count_256tok_r0": (
        "H6: 4x more patch tokens (64 px / patch 4 = 256, width 64, 2 heads): more redundant background to recycle.",
        "No outliers (max/median <= 2.9) in 1,033 steps (0.41 s/step). Attention is extremely concentrated (the "
        "most-attended patch gets ~110x uniform, i.e. ~40 % of each query's attention) but on objects "
        "(background in 10-34 % of images).",
    ),
    "S07_nocls_count_layerscale_r0": (
        "H5: LayerScale (init 1e-4), as DINOv2 and DeiT-III use: cheap per-channel amplification of a block's write.",
        "High-norm tokens appear, but not register-style: 18 % of last-block patches above 4x median (max 12x), "
        "on foreground and its edges (72 % background against 94 %); in blocks 1-2 a handful of tokens (0.01-0.1 %) "
        "carry a single-channel massive activation (82 % of the norm in 1 of 96 channels) and are attention "
        "hubs in the next block (lift 3.8-21), but they are object tokens (0 % background). Best count accuracy (80 %).",
    ),
    "S07b_nocls_count_layerscale_r4": (
        "The R = 4 twin of S07 (registers N(0, 0.02)): do registers take over the high norms?",
        "No: the last block keeps 12 % foreground outliers (S07: 18 %, not <= 1/5), register norms stay at "
        "0.6-0.9x the patch median, registers draw at most 5.8x uniform attention (block 0). LOST 0.121 vs 0.129.",
    ),
    "S08_cls_count_r0": (
        "H1's converse: the count task with a CLS readout. Prediction: the CLS becomes the sink, patches stay normal.",
        "Confirmed: patch queries give the CLS up to 32x its uniform share (block 0: half of their attention) at a "
        "normal norm (0.9-1.1x the patch median); no patch outliers on background (0.6 % in block 0, on foreground). "
        "Count accuracy 53 %.",
    ),
    "S09_nocls_count_hilr_r0": (
        "H4: a larger learning rate and weight decay (1e-2, wd 0.3, beta2 0.95, warmup 300; Gu et al. 2025: "
        "both strengthen sinks).",
        "The only measurement in the study that met the letter of the R = 0 criterion: at step 500 (end of warmup) "
        "block 2 had 2.8 % outliers, 86 % on background, lift 5.7. It was transient (gone by step 1000, "
        "max/median 1.5-2.5 after), and not preferentially on background (86 % < the 94 % of all patches). "
        "Training is poor at this lr (count accuracy 43 %).",
    ),
    "S10_nocls_count_sgd_r0": (
        "H4's control: SGD (momentum 0.9, lr 0.05, wd 1e-4): Guo et al. see no sinks without Adam.",
        "No outliers, and attention stays nearly uniform (most-attended patch 1-7x). Yet count accuracy is 74 % "
        "(AdamW S04: 57 %): with a mean-patch readout the count is nearly a linear function of pooled local "
        "features (the object area), so the task needs no attention at all. This undercuts H2 for every "
        "mean-pooled count/presence run, and motivated S15.",
    ),
    "S11_nocls_count_dense_r0": (
        "H3 on the count task: every patch predicts the count.",
        "No outliers (max/median <= 2.9) in 1,607 steps (0.26 s/step, a loaded machine); count accuracy 50 % "
        "(below the pooled S04); the most-attended patch is on an object (background in 34-54 % of images). "
        "No broadcast hub on background.",
    ),
    "S13_nocls_count_depth8_layerscale_r0": (
        "H6 + H5: 8 blocks (width 64, 2 heads) with LayerScale: S07's massive activations had only 2 middle "
        "blocks to live in; depth gives them room, as in DINOv2, where artifacts start in the middle.",
        "VERDICT_S13",
    ),
    "S14_nocls_count_lr6e-3_r0": (
        "H4 between S04 (3e-3) and S09 (1e-2): lr 6e-3, wd 0.1, warmup 300: can S09's transient background "
        "outliers persist at a learning rate the model still trains at? Measured every 250 steps.",
        "VERDICT_S14",
    ),
    "S15_nocls_parity_r0": (
        "After S10: a label that is not linear in pooled local features: is the number of objects odd? "
        "Every token (or the pooled one, through a linear head) needs a non-linear function of a global count.",
        "VERDICT_S15",
    ),
    "S09b_nocls_count_hilr_r0_s1": (
        "The second seed of S09, measured every 250 steps: does the transient come back?",
        "VERDICT_S09b",
    ),
}
