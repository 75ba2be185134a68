"""The factored policy: eight heads, causal masks, log-probabilities."""

from __future__ import annotations

import torch
from torch.distributions import Categorical

from tele_exporter import Telemetry
from tele_exporter.demo.env import HEADS, Op
from tele_exporter.demo.policy import Policy, causal_masks, entropies, joint, log_probs, sample

TELE_321_HEADS = (
    "op",
    "slot",
    "blueprint",
    "style",
    "tempo",
    "alpha_target",
    "alpha_speed",
    "alpha_curve",
)


def test_policy_has_the_eight_heads_of_tele_321_and_a_value() -> None:
    policy = Policy(obs_dim=12, n_slots=3)
    assert tuple(policy.head_modules()) == TELE_321_HEADS == HEADS
    logits, value = policy(torch.zeros(5, 12))
    assert logits["slot"].shape == (5, 3) and logits["op"].shape == (5, len(Op))
    assert value.shape == (5,)
    Telemetry(policy, heads=policy.head_modules()).close()


def test_causal_masks_follow_design_section_4() -> None:
    ops = torch.tensor([int(op) for op in Op])
    m = {h: v.tolist() for h, v in causal_masks(ops).items()}
    # columns: WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE, ADVANCE
    assert m["op"] == [1, 1, 1, 1, 1, 1]
    assert m["slot"] == [0, 1, 1, 1, 1, 1]
    assert m["blueprint"] == m["tempo"] == [0, 1, 0, 0, 0, 0]
    assert m["style"] == m["alpha_target"] == [0, 1, 1, 0, 0, 0]
    assert m["alpha_speed"] == m["alpha_curve"] == [0, 0, 1, 1, 0, 0]


def test_log_probs_and_entropies_match_categorical() -> None:
    torch.manual_seed(0)
    policy = Policy(obs_dim=12, n_slots=3)
    logits, _ = policy(torch.randn(7, 12))
    actions = sample(logits, torch.Generator().manual_seed(1))
    lp, ent = log_probs(logits, actions), entropies(logits)
    for h in HEADS:
        dist = Categorical(logits=logits[h])
        torch.testing.assert_close(lp[h], dist.log_prob(actions[h]))
        torch.testing.assert_close(ent[h], dist.entropy())


def test_joint_log_prob_counts_only_relevant_heads() -> None:
    ops = torch.tensor([int(Op.WAIT), int(Op.GERMINATE)])
    per_head = {h: torch.ones(2) for h in HEADS}
    assert joint(per_head, causal_masks(ops)).tolist() == [1.0, 6.0]
