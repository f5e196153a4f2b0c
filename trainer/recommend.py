"""Which checkpoint to use: a rule over the numbers each checkpoint's evaluation measured (trainer/evaluation.py).

The rule: among the checkpoints whose likeness is within MARGIN of the best likeness seen (it has learnt what
the training images look like, about as well as any), take the earliest whose leak is low (LEAK_SHARE of its
strength or less: it changes its own prompts, and leaves prompts without its trigger word mostly alone). Earliest,
because training longer past that point mostly adds leak and wears away what the prompt asks for (colours,
shapes) while likeness no longer rises. When no checkpoint near the best likeness has a low leak, the earliest of
them all the same, and the reason says that every one leaks: the leak then does not tell them apart (stop 28: on
a 4×-long demo style run every checkpoint's pictures without the trigger moved about as much as its own prompts',
from the sampler laying them out anew, not from stripes; ranking by leak over strength picked the last checkpoint
over the best one).

The validation loss is shown beside these but plays no part: a diffusion model's loss barely moves while what it
draws changes a lot. scripts/prove_recommendation.py checks the rule (and lowest validation loss) against the demo
world's true quality.
"""
from __future__ import annotations

import math

MARGIN = 0.1  # of the best likeness: checkpoints within it have learnt the look about equally well
LEAK_SHARE = 0.5  # a low leak: at most this share of the strength


def recommend(evaluations: list[dict], margin: float = MARGIN, leak_share: float = LEAK_SHARE) -> dict | None:
    """{"step", "reason"} for a list of `evaluation` events (step, strength, leak, likeness); None without any
    checkpoint whose likeness was measured."""
    # a likeness that is not a finite number (a checkpoint whose pictures came out NaN) rates nothing
    rated = sorted((e for e in evaluations if e.get("likeness") is not None and math.isfinite(e["likeness"])),
                   key=lambda e: e["step"])
    if not rated:
        return None
    best = max(rated, key=lambda e: e["likeness"])
    floor = best["likeness"] - margin * abs(best["likeness"])
    near = [e for e in rated if e["likeness"] >= floor]
    # no leak measured (no trigger word to leave out of the prompts): nothing to hold against a checkpoint
    low_leak = [e for e in near if e.get("leak") is None or e["leak"] <= leak_share * (e.get("strength") or 0)]
    near_text = (f"likeness {{l:.2f}} is within {margin:.0%} of the best, {best['likeness']:.2f} at step "
                 f"{best['step']}")
    if low_leak:
        pick = low_leak[0]
        leak = ("no leak was measured (no trigger word to leave out)" if pick.get("leak") is None else
                f"its leak ({pick['leak']:.3f}) is at most {leak_share:.0%} of its strength ({pick['strength']:.3f})")
        why = f"the earliest checkpoint whose {near_text.format(l=pick['likeness'])}; {leak}"
    else:
        pick = near[0]
        why = (f"the earliest checkpoint whose {near_text.format(l=pick['likeness'])}; every one of those leaks more "
               f"than {leak_share:.0%} of its strength (this one: leak {pick['leak']:.3f}, strength "
               f"{pick['strength']:.3f}), so the leak does not choose between them")
    return {"step": pick["step"], "reason": why, "likeness": pick["likeness"], "leak": pick.get("leak"),
            "strength": pick.get("strength")}
