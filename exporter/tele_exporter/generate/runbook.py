"""docs/runbook.md: one section per alert, built from the catalog's TELE text.

Every alert's `runbook_url` points at its section here; thresholds, `for:` and
PromQL come from the catalog and the rules generator, the advice from ADVICE.
"""

from __future__ import annotations

from ..catalog.model import Catalog, MetricSpec
from ..catalog.thresholds import THRESHOLD_METRIC, movable
from .rules import alert_rules, anchor

PATH = "docs/runbook.md"

# What an operator should do, by alert name. Prose only: thresholds stay in the catalog.
ADVICE: dict[str, str] = {
    "TeleGradNormHigh": (
        "Gradients are growing toward explosion. Lower the learning rate, check the loss scale "
        "and reward normalisation, and look at `tele_head_grad_norm` to find the head that "
        "carries the norm. A steadily rising `tele_policy_grad_norm` trend usually precedes a "
        "NaN (see TeleNonFiniteGradients)."
    ),
    "TeleGradNormVanishing": (
        "Learning has stalled: the pre-clip gradient is almost zero. Check that the loss still "
        "depends on the policy (entropy collapse, saturated activations, a detached tensor), "
        "and that the learning rate schedule has not decayed to nothing."
    ),
    "TeleKLDivergenceHigh": (
        "The policy changes too fast per update; PPO's trust region is being stretched and "
        "early stopping (`tele_ppo_early_stops_total`) cuts updates short. Lower the learning "
        "rate or the number of epochs per update, or lower `target_kl`. High KL in the first "
        "few updates after a fresh start can be initialisation noise."
    ),
    "TeleGradientCVHigh": (
        "Gradient signal is unevenly spread across the action heads: some heads dominate or "
        "starve. Compare `tele_head_grad_norm` per head, check the causal masks of the heads "
        "that starve, and consider per-head loss weights."
    ),
    "TeleClipFractionHigh": (
        "The surrogate clip cuts off a large part of each update: the policy moves further per "
        "update than the clip range allows, and the clipped samples stop contributing gradient. "
        "`tele_ppo_clip_fraction_side` says whether ratios overshoot upward (high) or downward "
        "(low). Lower the learning rate or the epochs per update, or use a smaller target KL; "
        "compare with `tele_kl_divergence` and `tele_head_ratio_max` to find the head that moves."
    ),
    "TelePolicyEntropyLow": (
        "The policy is becoming deterministic and stops exploring. Raise the entropy coefficient, "
        "check that the entropy bonus still reaches the loss (sign, masking), and look at "
        "`tele_head_entropy_normalized` for the head that collapsed. "
        "`tele_policy_entropy_velocity` tells how fast it is falling."
    ),
    "TeleEntropyCollapsed": (
        "The policy's entropy fell below the collapse threshold: it picks (nearly) the same action "
        "every time and learning usually stalls for good. Restore a checkpoint from before the "
        "collapse and raise the entropy coefficient or lower the learning rate."
    ),
    "TeleHeadEntropyLow": (
        "One action head (`head` label) is close to deterministic relative to its number of "
        "actions, even if the joint entropy still looks healthy. Check the head's causal mask "
        "(a head that is rarely active barely learns), per-head entropy weights, and whether the "
        "environment makes one choice dominant."
    ),
    "TeleExplainedVarianceLow": (
        "The value function predicts the returns poorly; below 0 it is worse than a constant, "
        "which usually means a bug or corrupted data: values and returns misaligned, a "
        "missing bootstrap at truncation, unnormalised rewards, or a value head that diverged. "
        "Check the value loss and its coefficient; a low value early in training is normal."
    ),
    "TeleAdvantageStdLow": (
        "The normalised advantages have almost no spread: the batch carries no learning signal, "
        "or normalisation divides by a huge std. Check reward scaling, the GAE lambda and gamma, "
        "and that the advantages are normalised once, over the valid transitions."
    ),
    "TeleAdvantageStdHigh": (
        "The advantages are not normalised as the loss expects (a normalised batch has std 1): "
        "normalisation is off, computed over the wrong steps (padding included), or a few "
        "extreme returns dominate. Check advantage normalisation and reward clipping."
    ),
    "TeleImportanceRatioSpike": (
        "A head's largest importance ratio (`head` label) left its run's own range: the update moves "
        "that head's policy far beyond where healthy updates of this run went. Lower the learning "
        "rate or the epochs, check the head's log-probabilities for mismatched masks, and compare "
        "with the KL and the clip fraction."
    ),
    "TeleGradNormSpike": (
        "The pre-clip gradient norm jumped to 10x (warning) or 100x (critical) its own median of the "
        "last 30 minutes: exploding gradients, unnormalised rewards or returns, a learning-rate "
        "schedule gone wrong, or a bad batch. `tele_head_grad_norm` shows which head or group "
        "carries it; a NaN often follows (TeleNonFiniteGradients)."
    ),
    "TeleGradNormDrop": (
        "The pre-clip gradient norm fell below 1/100 of its own recent median: learning stalled "
        "(entropy collapse, saturated activations, a detached loss, a learning rate decayed to nothing)."
    ),
    "TeleGradNormTrend": (
        "Early warning: the pre-clip norm's trend over the last 5 minutes reaches 10x its median "
        "within 10 minutes. Look at the same causes as TeleGradNormSpike before it fires."
    ),
    "TeleHeadGradNormSpike": (
        "One head or group (`head` label) left its own range, whatever the total does: an actor "
        "head can explode 100x behind a critic-dominated total. For an action head, check its "
        "logits and log-probabilities; for the value head (kind other), returns and value targets."
    ),
    "TeleLayerGradNormSpike": (
        "One layer (`layer` label, its module path) left its own gradient range (TELE-332): the place "
        "where the run went wrong, before the total shows it. Look at that layer's inputs (an "
        "unnormalised observation, a saturated activation before it), its initialisation and its "
        "learning rate; `tele_layer_update_ratio` says whether its weights are moving too far as well."
    ),
    "TeleDeadLayers": (
        "Layers (TELE-331) got a gradient whose norm stayed below 1e-7 all update long: no learning "
        "signal reaches them. Find them with `tele_layer_grad_norm < 1e-7`; look for dead ReLUs, "
        "saturated tanh or sigmoid units, a detached tensor, a frozen or zero-initialised layer, or a "
        "causal mask that never lets that head act. A layer without any gradient is missing, not dead."
    ),
    "TeleGradientCVSpike": (
        "The action heads' gradients became much more uneven than this run's usual (3x its CV median): "
        "one head is taking over the update. Find it in the heads table."
    ),
    "TeleKLDivergenceSpike": (
        "The policy changed 10x (warning) or 100x (critical) more per update than this run's usual: "
        "a learning rate or epoch count far too high for it, or a bad batch. Lower them, or set a "
        "target KL for early stopping."
    ),
    "TeleKLDivergenceTrend": (
        "Early warning: the KL's trend over the last 10 minutes reaches the critical level within 10 "
        "minutes. Lower the learning rate or epochs before TeleKLDivergenceHigh pages."
    ),
    "TeleEntropyNormalizedLow": (
        "The policy's entropy is a small fraction of its maximum over the action space: it has gone "
        "(nearly) deterministic. A healthy policy converging late in training can get here; if it came "
        "fast, check the entropy coefficient's sign and size and the learning rate."
    ),
    "TelePolicyEntropyFall": (
        "The entropy fell more than ln 10 nats below its recent median: for a Gaussian policy, its "
        "standard deviation shrank about 10x. Check the entropy coefficient, log_std's gradient "
        '(`tele_head_grad_norm{head="log_std"}` in SB3) and the learning rate.'
    ),
    "TeleAdvantageStdSpike": (
        "The advantages' spread jumped to 10x this run's usual: rewards or value targets changed "
        "scale. Check reward normalisation and the value function."
    ),
    "TeleAdvantageStdDrop": (
        "The advantages' spread fell below a tenth of this run's usual: rewards stopped varying, or "
        "the value function matches returns trivially. Check the environment's rewards."
    ),
    "TeleSeedGradientVanishing": (
        "The seed's parameters receive far less gradient per element than its host's: it "
        "learns much slower than the network it grows in. Check the seed's alpha blending (an "
        "alpha near 0 starves it) and initialisation; a seed that stays here is a prune "
        "candidate. A ratio of exactly 0 means no gradient data, not vanishing. "
        "`tele_seed_backward_gain` (from `watch_seed(..., backward_gain=True)`) tells whether the "
        "seed also damps the gradient it passes back."
    ),
    "TeleSeedGradientExploding": (
        "The seed's parameters receive far more gradient per element than its host's and can "
        "destabilise it (a NaN or Inf ratio counts here too, and fires TeleNonFiniteGradients). "
        "Lower the seed's alpha or learning rate, check its weight scale, or prune it."
    ),
    "TeleNonFiniteGradients": (
        "An optimizer step produced a NaN or Inf gradient, or a metric with levels is NaN (the "
        "`metric` label names the series, `head` the action head): a NaN entropy, explained "
        "variance, advantage std or ratio comes from NaN log-probabilities, values or returns, "
        "which a NaN gradient usually follows. Training on non-finite gradients corrupts the "
        "weights: stop, restore the last good checkpoint, and look for a log of zero, a division "
        "by a vanishing std or an overflow in mixed precision. NaN fails every PromQL comparison, "
        "so the level alerts go silent on NaN; this alert covers it. Where it started: the "
        "description names the update's first non-finite head and its step (0-based within the "
        "update), from `tele_nonfinite_first_step{head, kind}`; `tele_nonfinite_gradients_total`'s "
        "`value` label tells NaN steps from Inf ones (an Inf alone is an overflow: the loss scale "
        'or an exploding activation), and `tele_head_gradient_state{state="nonfinite"}` lists '
        "every head that went non-finite in the latest update."
    ),
    "TeleLogProbLow": (
        "Some action the policy took (or is evaluated on) has a log-probability at or below -50 "
        "(warning) or -100 (critical): a probability of 2e-22 or less. The ratio exp(new - old) "
        "of such an action under- or overflows, and a NaN gradient (TeleNonFiniteGradients) "
        "usually follows. Check the logits' scale (unnormalised or exploding logits), masks that "
        "leave a head with one near-impossible action, and the entropy coefficient; "
        "`tele_head_ratio_max` and `tele_head_clip_fraction` show which head moves. For a "
        "continuous policy these are log-densities, which is why only runs on the records' scale page."
    ),
    "TeleTelemetryErrors": (
        "tele-exporter caught an exception while measuring (the `site` label says where: "
        "`clip_grad_norm`, `observe_gradients`, `seed_hook`, `seed_grad_hook`, `publish`). "
        "Training went on; the failed values are missing (absent or NaN), never 0, so the "
        "level alerts stay silent about them. The trainer's log holds the first traceback per "
        "site. Common causes: sparse gradients, a policy wrapped in legacy FullyShardedDataParallel "
        "after its Telemetry was built (use FSDP2's fully_shard, docs/scale.md), a seed module that "
        "returns something unexpected. `tele_telemetry_errors_total` counts them."
    ),
    "TeleTelemetryAbsent": (
        "A run that never said it finished (`tele.finish()`, tele_run_finished 1) went quiet: the "
        "process died, was killed or hangs, or its target is down. Check the trainer's logs and `up`. "
        "A run that ends cleanly calls finish() before its server's close(), so its absence pages nobody."
    ),
    "TeleRanksMissing": (
        "Some ranks of a distributed job are down or not scraped while others still report. Check "
        "the missing ranks' logs (`tele_world_size` says how many there should be, "
        "`job:tele_ranks:count` how many are up), whether a node is gone, stopped or cut off from "
        "Prometheus, and whether every rank's target is in the file_sd list (docs/scale.md). With "
        "DDP the remaining ranks are blocked in their next collective until torchrun's timeout."
    ),
    "TeleRankLagging": (
        "One rank has stopped publishing PPO updates while the freshest rank of its job goes on, "
        "and its /metrics still answers, so `up` is 1. Typical causes: hung in a collective that "
        "its peers never enter, a stuck data loader or environment, or a much slower device. Look "
        "at the rank's stack (py-spy dump), then at `tele_torchrun_restarts` and the other ranks."
    ),
}


def _clip_note(spec: MetricSpec) -> str:
    on = ", ".join(f'{key}="{value}"' for key, value in spec.alert_on.items())
    return (
        f"**Pre- vs post-clip.** The TELE record is torn between the pre- and the post-clip "
        f"norm. `{spec.name}` exports both; the alert watches only `{on}`, because a post-clip "
        "norm never exceeds `max_norm` (with max_norm 0.5 it could never reach the warning "
        "level). Dashboards show both.\n"
    )


def _section(catalog: Catalog, name: str) -> str:
    rules = [r for r in alert_rules(catalog) if r.name == name]
    spec = rules[0].metric
    tele = ", ".join(spec.tele) if spec.tele else "none (tele-exporter's own health)"
    lines = [
        f"## {name}",
        "",
        f"**Metric:** `{spec.name}` · **TELE:** {tele}",
        "",
        f"> {spec.question}",
        "",
        spec.help,
        "",
    ]
    if spec.levels:
        lines += ["| Level | Values | Status | Alert |", "|---|---|---|---|"]
        for level in spec.levels:
            alert = f"{level.alert.name}, {level.alert.severity}, for {level.alert.for_}" if level.alert else "none"
            lines.append(f"| {level.name} | `{level.when}` | {level.status} | {alert} |")
        lines += [
            "",
            "Intervals: `[` and `]` include the boundary, `(` and `)` exclude it.",
            "",
        ]
    lines += ["| Severity | for | PromQL |", "|---|---|---|"]
    for rule in rules:
        expr = (rule.catalog_expr or rule.expr).replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {rule.severity} | {rule.for_} | `{expr}` |")
    if any(rule.catalog_expr for rule in rules) and THRESHOLD_METRIC in catalog.metrics and not movable(spec):
        lines += [
            "",
            "The catalog's levels, as above, for every run: none of them starts above 0, so no run moves them.",
        ]
    elif any(rule.catalog_expr for rule in rules) and THRESHOLD_METRIC in catalog.metrics:
        lines += [
            "",
            "With the catalog's levels, as above. A run that sets its own thresholds (README, "
            f'"Thresholds per run") exports them as `{catalog[THRESHOLD_METRIC].name}{{metric="{spec.name}"}}`, '
            "and the rule holds that run to them with the same `>`/`>=` operators "
            "(see prometheus/rules/tele-alerts.yml).",
        ]
    lines += ["", f"**What to do.** {ADVICE.get(name, spec.question)}", ""]
    if spec.alert_on and spec.levels:
        lines.append(_clip_note(spec))
    return "\n".join(lines)


def alert_names(catalog: Catalog) -> list[str]:
    """Alert names in catalog order, each once."""
    return list(dict.fromkeys(r.name for r in alert_rules(catalog)))


def files(catalog: Catalog) -> dict[str, str]:
    """The runbook, by path relative to the repository root."""
    names = alert_names(catalog)
    head = [
        "<!-- generated by tele-exporter generate from catalog.yaml; do not edit -->",
        "# tele-exporter runbook",
        "",
        "One section per alert of `prometheus/rules/tele-alerts.yml` and "
        "`prometheus/rules/tele-ranks.yml`; each alert's "
        "`runbook_url` links here. Warning and critical of one condition share the alert "
        "name and differ in the `severity` label; Alertmanager lets a critical inhibit the "
        "warning of the same alert name. Every rule selects the trainer with "
        f"`{{{catalog.selector}}}` (the catalog's `selector`).",
        "",
        *[f"- [{name}](#{anchor(name)})" for name in names],
        "",
    ]
    body = [_section(catalog, name) for name in names]
    return {PATH: "\n".join(head) + "\n" + "\n".join(body).rstrip("\n") + "\n"}
