"""The verdict of ``regablate inspect``: are a model's high-norm tokens register-style artifacts?

It reads the flat ``artifacts/...`` statistics of one scan (``regablate.artifacts.scan``) and
answers with one of three labels, each with the numbers behind it:

* ``no outliers``: under ``ONSET_MIN_FRACTION`` of the last block's patch tokens are outliers;
* ``register-style``: the outliers behave like the artifacts of Darcet et al. (2024): on
  background, on patches that are redundant already at the input, with their norm in a few
  channels, and drawing attention (a sink);
* ``not register-style``: high-norm tokens that behave otherwise, e.g. large foreground
  features of a model trained hard (they sit on objects and draw no attention).

Each test compares the outliers with ordinary patches and votes for (+1), against (-1) or
neither (0); the two that separate the two kinds best (background, attention) weigh double:

* background (x2, needs masks): for when the outliers sit on background at least half-way from
  the share of all patches to always; against when no more often than all patches;
* attention (x2): for when the outliers entering the last block draw ``SINK_LIFT`` times their
  uniform share of its attention or more (a sink); against under ``NO_SINK_LIFT`` times, or when
  none enters it (they only appear in the last block's output, where nothing attends to them);
* input redundancy: for when their input patches' cosine to their neighbours is ``COSINE_MARGIN``
  above the patch average; against when it is no higher;
* channels: for when their top-1% channel share is ``CONCENTRATION_RATIO`` times that of
  ordinary tokens or more; against under ``NOT_CONCENTRATED_RATIO`` times.

The label is ``register-style`` when the weighted votes add up to more than zero and neither
double-weight test votes against; otherwise ``not register-style``. Without masks the
background test is not run (and says so); the others decide. The onset block and the register
norms are reported beside the votes: they describe the outliers but do not tell the two kinds apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from regablate.artifacts.stats import ONSET_MIN_FRACTION, TOP_CHANNEL_SHARE, Threshold

LABELS = ("register-style", "not register-style", "no outliers")
SINK_LIFT = 3.0
NO_SINK_LIFT = 1.5
COSINE_MARGIN = 0.02
CONCENTRATION_RATIO = 2.0
NOT_CONCENTRATED_RATIO = 1.25
DECISIVE = ("background", "attention")
WEIGHTS = {"background": 2, "attention": 2, "input redundancy": 1, "channels": 1}
NO_MASKS = "not run: no masks (give --masks DIR with --images, or use synthetic scenes)"


@dataclass(frozen=True)
class Vote:
    """One test: its vote (+1 for register-style, -1 against, 0 neither), weight and numbers."""

    test: str
    vote: int
    says: str
    outliers: float | None = None
    patches: float | None = None

    @property
    def weight(self) -> int:
        return WEIGHTS[self.test]

    @property
    def side(self) -> str:
        return {1: "for", -1: "against", 0: "neither"}[self.vote]


@dataclass
class Verdict:
    """The label, the votes behind it and the facts beside them (see the module docstring)."""

    label: str
    reason: str
    outlier_frac: float
    onset_block: int | None
    votes: list[Vote] = field(default_factory=list)
    background_test: str = "run"
    registers: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> int:
        return sum(v.vote * v.weight for v in self.votes)

    @property
    def max_score(self) -> int:
        return sum(v.weight for v in self.votes)

    def to_json(self) -> dict[str, Any]:
        """What ``stats.json`` keeps under ``verdict``."""
        return {
            "label": self.label,
            "reason": self.reason,
            "score": self.score,
            "max_score": self.max_score,
            "outlier_frac": self.outlier_frac,
            "onset_block": self.onset_block,
            "background_test": self.background_test,
            "tests": {
                v.test: {**{k: x for k, x in asdict(v).items() if k != "test"}, "side": v.side, "weight": v.weight}
                for v in self.votes
            },
            "registers": self.registers,
        }


def decide(stats: dict[str, float]) -> Verdict:
    """The verdict on one scan's flat ``artifacts/...`` statistics."""
    get = stats.get
    frac = stats["artifacts/outlier_frac"]
    onset = get("artifacts/outlier_onset_block")
    facts: dict[str, Any] = {
        "outlier_frac": frac,
        "onset_block": None if onset is None else int(onset),
        "registers": _registers(stats),
        "background_test": "run" if get("artifacts/patch_background_share") is not None else NO_MASKS,
    }
    if frac < ONSET_MIN_FRACTION:
        reason = f"under {ONSET_MIN_FRACTION:.1%} of the last block's patch tokens are outliers"
        if facts["registers"].get("over_patch_median", 0.0) >= 2.0:
            reason += (
                f"; the registers hold {facts['registers']['over_patch_median']:.1f}x the median patch norm "
                "(they may have taken over the scratch space)"
            )
        return Verdict("no outliers", reason, **facts)
    votes = [
        vote
        for vote in (_background(stats), _attention(stats), _redundancy(stats), _channels(stats))
        if vote is not None
    ]
    verdict = Verdict("", "", votes=votes, **facts)
    blocking = [v for v in votes if v.test in DECISIVE and v.vote < 0]
    if verdict.score > 0 and not blocking:
        verdict.label = "register-style"
        verdict.reason = "; ".join(v.says for v in votes if v.vote > 0)
    else:
        verdict.label = "not register-style"
        against = blocking or [v for v in votes if v.vote < 0]
        verdict.reason = "; ".join(v.says for v in against) if against else "no test speaks for artifacts"
    return verdict


def _registers(stats: dict[str, float]) -> dict[str, float]:
    mean = stats.get("artifacts/register_norm_mean")
    if mean is None:
        return {}
    median = stats["artifacts/patch_norm_median"]
    return {
        "norm_mean": mean,
        "norm_max": stats["artifacts/register_norm_max"],
        "over_patch_median": mean / max(median, 1e-12),
    }


def _background(stats: dict[str, float]) -> Vote | None:
    share, base = stats.get("artifacts/outlier_background_share"), stats.get("artifacts/patch_background_share")
    if share is None or base is None:
        return None
    clearly = base + 0.5 * (1.0 - base)
    if share >= clearly:
        vote, says = 1, f"{share:.0%} of them sit on background (all patches {base:.0%})"
    elif share <= base:
        vote, says = (
            -1,
            f"they sit on objects at least as often as other patches ({share:.0%} on background, all {base:.0%})",
        )
    else:
        vote, says = 0, f"{share:.0%} on background, a little above all patches' {base:.0%}"
    return Vote("background", vote, says, share, base)


def _attention(stats: dict[str, float]) -> Vote:
    lift = stats.get("artifacts/outlier_attention_lift")
    if lift is None:
        return Vote("attention", -1, "they only appear in the last block's output, so no attention ever reads them")
    share = stats["artifacts/outlier_attention_share"]
    if lift >= SINK_LIFT:
        vote, says = 1, f"they draw {share:.0%} of last-block attention, {lift:.1f}x uniform (a sink)"
    elif lift < NO_SINK_LIFT:
        vote, says = -1, f"they draw little attention ({lift:.1f}x uniform)"
    else:
        vote, says = 0, f"they draw some attention ({lift:.1f}x uniform)"
    return Vote("attention", vote, says, lift, 1.0)


def _redundancy(stats: dict[str, float]) -> Vote | None:
    cosine, base = stats.get("artifacts/outlier_neighbour_cosine"), stats.get("artifacts/patch_neighbour_cosine")
    if cosine is None or base is None:
        return None
    if cosine >= base + COSINE_MARGIN:
        vote, says = 1, f"their input patches match their neighbours (cosine {cosine:.2f}, all patches {base:.2f})"
    elif cosine <= base:
        vote, says = -1, f"their input patches are no more redundant than others (cosine {cosine:.2f}, all {base:.2f})"
    else:
        vote, says = 0, f"their input patches are about as redundant as others (cosine {cosine:.2f}, all {base:.2f})"
    return Vote("input redundancy", vote, says, cosine, base)


def _channels(stats: dict[str, float]) -> Vote | None:
    share, base = (
        stats.get("artifacts/outlier_channel_concentration"),
        stats.get("artifacts/patch_channel_concentration"),
    )
    if share is None or base is None:
        return None
    ratio = share / max(base, 1e-12)
    top = f"top {TOP_CHANNEL_SHARE:.0%} of channels hold {share:.0%} of their norm (ordinary tokens {base:.0%})"
    if ratio >= CONCENTRATION_RATIO:
        vote, says = 1, f"their norm sits in a few channels: {top}"
    elif ratio < NOT_CONCENTRATED_RATIO:
        vote, says = -1, f"their norm is spread like ordinary tokens': {top}"
    else:
        vote, says = 0, top
    return Vote("channels", vote, says, share, base)


def summary_lines(stats: dict[str, float], verdict: Verdict, threshold: Threshold, depth: int) -> list[str]:
    """The printed summary: the outliers, every test with its numbers and vote, the registers, the verdict."""
    frac, onset = verdict.outlier_frac, verdict.onset_block
    lines = [
        f"outlier fraction : {frac:.2%} of the last block's patch tokens ({threshold.describe()})",
        f"outliers start at: block {onset} of 0-{depth - 1}"
        if onset is not None
        else f"outliers start at: no block (none has >= {ONSET_MIN_FRACTION:.1%} outliers through to the last)",
        f"max/median norm  : {stats['artifacts/norm_max_over_median']:.1f}x in the last block "
        "(~10x with artifacts, 2-3x without)",
    ]
    if verdict.label != "no outliers":
        for vote in verdict.votes:
            weight = f", x{vote.weight}" if vote.weight > 1 else ""
            lines.append(f"{vote.test:<17}: {vote.says} [{vote.side}{weight}]")
        if verdict.background_test != "run":
            lines.append(f"{'background':<17}: {verdict.background_test}")
    if verdict.registers:
        r = verdict.registers
        lines.append(
            f"{'registers':<17}: norm mean {r['norm_mean']:.3g}, max {r['norm_max']:.3g} "
            f"({r['over_patch_median']:.1f}x the median patch norm)"
        )
    if verdict.label == "no outliers":
        lines.append(f"verdict          : no artifacts, no outliers: {verdict.reason}")
    else:
        score = f"score {verdict.score:+d} of {verdict.max_score}"
        register_style = verdict.label == "register-style"
        kind = "register-style artifacts" if register_style else "high-norm tokens, not register-style"
        sides = [
            f"{side}: {', '.join(v.test for v in verdict.votes if v.side == side)}"
            for side in ("for", "against", "neither")
            if any(v.side == side for v in verdict.votes)
        ]
        lines.append(f"verdict          : {kind} ({score}; {'; '.join(sides)})")
    return lines
