"""Native GRPO (qlorakit.train_grpo, `qlorakit grpo`): the advantages, the per-token terms and the three loss
normalisations against the formulas written out, the objective's loss and gradient on hand-built rollouts
(packed, accumulated, zero-advantage completions skipped), the reference and its KL, learning a reward on a tiny
model, the precision policy, an exact resume, the errors of rewards, data and settings, and the command."""

from __future__ import annotations

import importlib
import json
import math
import random
import sys
import uuid

import pytest
import torch

import qlorakit
from conftest import DTYPES, randomize_lora_b
from qlorakit.data.prompts import TokenizedPrompt
from qlorakit.data.tokenize import IGNORE_INDEX, encode_text
from qlorakit.generation.batching import Answer
from qlorakit.grpo import STD_EPSILON, GRPOObjective, RolloutBatch, group_advantages, token_terms
from qlorakit.rewards import RewardError

EXPECTED_ADAPTER = {"fp32": torch.float32, "fp16": torch.float32, "bf16": torch.bfloat16}
ROLLOUT_KEYS = ("reward", "reward_std", "completion_length", "truncated", "clip_fraction", "zero_std_groups",
                "generation_s", "training_s", "rollout_tokens_per_s")
QUIET = dict(log=lambda *a: None, progress=False)


def _rows(n=8, seed=0):
    """Prompts of tiny-tokenizer words, each with the fields rewards read."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(f"w{rng.randrange(10, 250)}" for _ in range(4)), "answer": "w10", "id": i}
            for i in range(n)]


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """prompts.jsonl (8 prompts) and rewards.py: `spread`, a reward that varies with the completion's words (so
    groups are rarely flat and every step trains), and the failing rewards of the error tests."""
    root = tmp_path_factory.mktemp("grpo-files")
    _write_rows(root / "prompts.jsonl", _rows())
    (root / "rewards.py").write_text(
        "import math\n"
        "def spread(prompts, completions, rows):\n"
        "    return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) / 7 for c in completions]\n"
        "def boom(prompts, completions, rows):\n"
        "    for row in rows:\n"
        "        if row['id'] == 2:\n"
        "            raise ValueError('no score for id 2')\n"
        "    return [0.0] * len(completions)\n"
        "def not_a_number(prompts, completions, rows):\n"
        "    return [math.nan if row['id'] == 2 else 0.0 for row in rows]\n"
        "def one_short(prompts, completions, rows):\n"
        "    return [0.0] * (len(completions) - 1)\n", encoding="utf-8")
    return root


def _spec(files, name="spread"):
    return f"{files / 'rewards.py'}:{name}"


def _grpo(model_dir, data, out, dtype="fp32", quant="nf4", log=None, **settings):
    """A GRPO run on a freshly loaded tiny model: 4 prompts x 4 completions of at most 4 tokens a step."""
    model, tokenizer = qlorakit.load(model_dir, quant=quant, dtype=dtype, device="cpu")
    config = dict(data=str(data), output=str(out), rank=4, alpha=8, batch_size=4, group_size=4, max_new_tokens=4,
                  max_length=32, lr=2e-2, max_steps=2, schedule="constant", warmup_steps=0, seed=0) | settings
    quiet = QUIET | ({"log": log} if log is not None else {})
    return qlorakit.train_grpo(loaded=(model, tokenizer), **quiet, **config)


def _steps(run):
    return [r for r in run.metrics if "loss" in r]


# ---------------------------------------------------------------------------------------------- advantages


def test_group_advantages_are_the_groups_normalised_rewards():
    """Against the formula in float64 (1e-6): (r - the group's mean) / (its unbiased std + 1e-4) for grpo/dapo,
    r - mean for dr_grpo; a group of equal rewards is exactly 0 and flagged."""
    rewards = [1.0, 0.0, 0.0, 0.5, 2.0, -1.0, 0.25, 3.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0.0]
    g = 4
    scaled, centred, flat = [], [], []
    for k in range(0, len(rewards), g):
        group = rewards[k:k + g]
        mean = sum(group) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1))
        scaled += [(r - mean) / (std + 1e-4) for r in group]
        centred += [r - mean for r in group]
        flat.append(len(set(group)) == 1)
    advantages, flags = group_advantages(torch.tensor(rewards), g)
    assert advantages.dtype == torch.float32 and STD_EPSILON == 1e-4
    torch.testing.assert_close(advantages, torch.tensor(scaled), rtol=1e-6, atol=1e-6)
    assert flags.tolist() == flat
    advantages, flags = group_advantages(torch.tensor(rewards), g, scale=False)
    torch.testing.assert_close(advantages, torch.tensor(centred), rtol=1e-6, atol=1e-6)
    assert flags.tolist() == flat


def test_rewards_near_fp32s_range_give_finite_advantages():
    """A group's sum of rewards past fp32's range (3e38 + 2e38) is computed in the reduction dtype: the advantages
    are +-1/sqrt(2) as for any two different rewards (1e-6), not NaN."""
    from qlorakit.grpo import group_advantages

    advantages, flat = group_advantages(torch.tensor([3e38, 2e38]), 2)
    assert advantages.dtype == torch.float32 and not flat.any()
    assert advantages.tolist() == pytest.approx([2 ** -0.5, -(2 ** -0.5)], abs=1e-6)


@pytest.mark.parametrize("value, g", [(0.9, 3), (0.1, 8), (0.3, 6)])
@pytest.mark.parametrize("scale", [True, False])
def test_a_group_of_equal_rewards_has_advantage_exactly_zero(value, g, scale):
    """Equal rewards whose fp32 mean rounds away from them (the premise is checked: r - mean is an ulp, /(std+eps)
    ~1e-4 without the rule): advantages exactly 0 (==), in a batch beside a group that is not flat."""
    group = torch.full((1, g), value)
    assert (group - group.mean(dim=1, keepdim=True)).abs().max() > 0  # the premise
    rewards = torch.cat([torch.full((g,), value), torch.arange(g, dtype=torch.float32) ** 2 + 0.1])
    advantages, flat = group_advantages(rewards, g, scale=scale)
    assert advantages[:g].tolist() == [0.0] * g and flat.tolist() == [True, False]
    assert bool((advantages[g:] != 0).any())


# ---------------------------------------------------------------------------------------------- per-token terms


def _expected_terms(logps, old, advantages, reference, beta, epsilon, epsilon_high):
    """The clipped surrogate written out per token (float64): A >= 0 takes min(ratio, 1 + eps_high), A < 0
    max(ratio, 1 - eps); the ratio is clipped where that bound is the one taken; k3 KL towards the reference."""
    losses, kls, clipped = [], [], []
    for lp, o, a, ref in zip(logps, old, advantages, reference):
        ratio = math.exp(lp - o)
        if a >= 0:
            loss, cut = -a * min(ratio, 1 + epsilon_high), a > 0 and ratio > 1 + epsilon_high
        else:
            loss, cut = -a * max(ratio, 1 - epsilon), ratio < 1 - epsilon
        kl = math.exp(ref - lp) - (ref - lp) - 1
        losses.append(loss + beta * kl)
        kls.append(kl)
        clipped.append(cut)
    return losses, kls, clipped


def test_token_terms_are_the_clipped_surrogate_and_k3():
    """Hand-made log-probabilities with ratios on both sides of both bounds, A > 0 and A < 0, epsilon 0.2 and
    epsilon_high 0.28: loss terms and KL as the formulas (fp32, 1e-6), the clipped tokens flagged, and their
    gradient 0 (beta = 0) while the others' is -A x ratio."""
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7, -2.2, -1.1, -0.9])
    # ratios 1.65, 1.11, 0.61, 0.90 (A > 0); 1.35, 1.22, 0.74 (A < 0); 1 (A = 0); 1.25 (A > 0: inside
    # 1 + epsilon_high, outside 1 + epsilon)
    shift = torch.tensor([0.5, 0.1, -0.5, -0.1, 0.3, 0.2, -0.3, 0.0, 0.22])
    logps = old + shift
    advantages = torch.tensor([1.5, 1.5, 1.5, 1.5, -0.8, -0.8, -0.8, 0.0, 2.0])
    reference = torch.tensor([-1.2, -1.0, -1.5, -2.5, -1.0, -0.9, -2.0, -1.3, -0.2])
    beta, epsilon, epsilon_high = 0.05, 0.2, 0.28
    want_loss, want_kl, want_clipped = _expected_terms(logps.double().tolist(), old.double().tolist(),
                                                       advantages.tolist(), reference.double().tolist(), beta,
                                                       epsilon, epsilon_high)
    # both bounds bite, each on its own side: A > 0 above 1 + eps_high, A < 0 below 1 - eps
    assert want_clipped == [True, False, False, False, False, False, True, False, False]
    loss, kl, clipped = token_terms(logps, old, advantages, reference, beta, epsilon, epsilon_high)
    torch.testing.assert_close(loss, torch.tensor(want_loss, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl, torch.tensor(want_kl, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    assert clipped.tolist() == want_clipped

    # gradients (beta 0): the clipped tokens' is 0; the others' d/dlogp of -A * ratio
    x = logps.clone().requires_grad_(True)
    loss, kl, _ = token_terms(x, old, advantages, None, 0.0, epsilon, epsilon_high)
    assert kl is None
    loss.sum().backward()
    ratio = torch.exp(logps - old)
    want_grad = torch.where(torch.tensor(want_clipped), torch.zeros_like(ratio), -advantages * ratio)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-6, atol=1e-6)


def test_epsilon_high_moves_only_the_upper_bound():
    """A ratio of 1.25 with A > 0 is clipped under epsilon_high 0.2 and not under 0.28; a ratio of 0.75 with A < 0
    is clipped under either (the lower bound is 1 - epsilon). Exact flags; loss terms to 1e-6."""
    logps = torch.log(torch.tensor([1.25, 0.75]))
    old, advantages = torch.zeros(2), torch.tensor([1.0, -1.0])
    _, _, clipped = token_terms(logps, old, advantages, None, 0.0, 0.2, 0.2)
    assert clipped.tolist() == [True, True]
    loss, _, clipped = token_terms(logps, old, advantages, None, 0.0, 0.2, 0.28)
    assert clipped.tolist() == [False, True]
    torch.testing.assert_close(loss, torch.tensor([-1.25, 0.8]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the objective


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The tiny model, nf4 + fp32, with LoRA adapters whose B is non-zero: the policy differs from the reference
    (adapters disabled) and every LoRA gradient is non-zero."""
    model, tokenizer = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    model = qlorakit.add_lora(model, rank=4, alpha=8)
    randomize_lora_b(model, std=0.1)
    return model, tokenizer


# (prompt ids, completion ids): different lengths, a one-token completion among them
SEQUENCES = [([5, 17, 33], [40, 41, 42, 43]), ([9, 8, 7, 6, 90], [100]), ([12], [13, 14, 15, 16, 17, 18]),
             ([60, 61], [62, 63])]
ADVANTAGES = [0.7, -1.3, 0.4, -0.25]
MAX_NEW = 6


def _packed(sequences, advantages, completions=None, completion_tokens=None, reference=None) -> RolloutBatch:
    """A RolloutBatch written out: the sequences packed in one row, the completions' tokens as labels, positions
    restarting at each sequence, each token's sequence index; counts default to what it holds."""
    ids, labels, positions, owner = [], [], [], []
    for k, (prompt, completion) in enumerate(sequences):
        ids += prompt + completion
        labels += [IGNORE_INDEX] * len(prompt) + completion
        positions += list(range(len(prompt) + len(completion)))
        owner += [k] * (len(prompt) + len(completion))
    row = lambda values: torch.tensor([values])  # noqa: E731
    return RolloutBatch(row(ids), row(labels), row(positions), None, sequences=row(owner), reference=reference,
                        advantages=torch.tensor(advantages, dtype=torch.float32),
                        completions=len(sequences) if completions is None else completions,
                        completion_tokens=(sum(len(c) for _, c in sequences) if completion_tokens is None
                                           else completion_tokens))


def _direct_logps(model, sequences, temperature):
    """Each completion's token log-probabilities from its own (unpacked) forward: the full logits / temperature,
    log_softmax in fp32."""
    out = []
    for prompt, completion in sequences:
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, :-1].float() / temperature
        logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
        out.append(logps[len(prompt) - 1:])
    return out


def _direct_loss(kind, logps, advantages, reference, beta, completions, tokens, max_new):
    """The step's loss written out (ratio 1: old = the same log-probabilities, detached)."""
    terms = []
    for lp, a, ref in zip(logps, advantages, reference):
        t = -a * torch.exp(lp - lp.detach())
        if beta:
            t = t + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
        terms.append(t)
    if kind == "grpo":
        return sum(t.mean() for t in terms) / completions
    if kind == "dapo":
        return sum(t.sum() for t in terms) / tokens
    return sum(t.sum() for t in terms) / (completions * max_new)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _objective_loss(objective, model, batch, counts):
    outputs = objective.forward(model, batch.model_inputs(), batch.labels, batch.sequences)
    return objective.loss(outputs, batch, counts)


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo"])
def test_each_normalisation_on_hand_made_log_probabilities(monkeypatch, kind):
    """GRPOObjective.loss on a packed batch of 4 completions (1 to 6 tokens) given hand-made log-probabilities
    and old ones (token_terms handed the old values: ratios 0.6 to 1.6, both bounds biting, epsilon 0.2,
    epsilon_high 0.28) and a reference (beta 0.05), with counts that also stand for a completion left out: the
    loss is the per-token formula normalised as the kind says, written out in float64 (fp32, 1e-6), its gradient
    that normalisation's weight per token (1e-6), and the clipped tokens counted."""
    import qlorakit.grpo as grpo

    batch = _packed(SEQUENCES, ADVANTAGES)
    lengths = [len(c) for _, c in SEQUENCES]
    n_tokens = sum(lengths)
    logps = torch.linspace(-3.0, -0.5, n_tokens)
    shift = torch.tensor([0.5, -0.5, 0.1, -0.3, 0.22, 0.4, -0.4, 0.05, -0.1, 0.3, -0.25, 0.35, -0.6])
    old = logps - shift
    reference = logps + torch.linspace(-0.4, 0.4, n_tokens)
    batch.reference = reference
    beta, epsilon, epsilon_high = 0.05, 0.2, 0.28
    completions, tokens, max_new = len(SEQUENCES) + 1, n_tokens + 3, MAX_NEW
    real = grpo.token_terms
    monkeypatch.setattr(grpo, "token_terms", lambda new, _old, *rest: real(new, old, *rest))
    objective = GRPOObjective([], group_size=2, max_new_tokens=max_new, loss=kind, beta=beta, epsilon=epsilon,
                              epsilon_high=epsilon_high)
    where = batch.labels[:, 1:].reshape(-1) != IGNORE_INDEX
    x = logps.clone().requires_grad_(True)
    loss, stats = objective.loss((x, where), batch, [completions, tokens])
    loss.backward()

    per_token_a = [a for a, n in zip(ADVANTAGES, lengths) for _ in range(n)]
    terms, _, clipped = _expected_terms(logps.double().tolist(), old.double().tolist(), per_token_a,
                                        reference.double().tolist(), beta, epsilon, epsilon_high)
    assert any(c and a > 0 for c, a in zip(clipped, per_token_a))
    assert any(c and a < 0 for c, a in zip(clipped, per_token_a))
    owner = [k for k, n in enumerate(lengths) for _ in range(n)]
    if kind == "grpo":
        weights = [1 / (lengths[k] * completions) for k in owner]
    elif kind == "dapo":
        weights = [1 / tokens] * n_tokens
    else:
        weights = [1 / (completions * max_new)] * n_tokens
    assert float(loss.detach()) == pytest.approx(sum(w * t for w, t in zip(weights, terms)), abs=1e-6)
    ratio = torch.exp(shift).double().tolist()
    grad = [w * ((0.0 if c else -a * r) + beta * (1 - math.exp(ref - lp)))
            for w, c, a, r, ref, lp in zip(weights, clipped, per_token_a, ratio, reference.double().tolist(),
                                           logps.double().tolist())]
    torch.testing.assert_close(x.grad, torch.tensor(grad, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    assert stats["clipped"] == sum(clipped)
    assert stats["kl"] == pytest.approx(sum(math.exp(r - lp) - (r - lp) - 1 for r, lp in
                                            zip(reference.double().tolist(), logps.double().tolist())), rel=1e-5)
    summary = objective.summary(stats, [completions, tokens])
    assert summary["clip_fraction"] == pytest.approx(sum(clipped) / tokens)
    assert summary["kl"] == pytest.approx(stats["kl"] / tokens)


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_on_packed_rollouts_is_the_direct_computation(policy, kind, beta):
    """Four completions of different lengths packed in one row (temperature 0.7, counts that also stand for a
    completion left out): the loss equals the formula over each sequence's own forward (fp32, 1e-6), and so
    does its gradient on every LoRA weight (rtol 1e-4, atol 1e-6)."""
    model, _ = policy
    temperature = 0.7
    direct = _direct_logps(model, SEQUENCES, temperature)
    # hand-made reference values near the policy's (k3 of a log-ratio of -0.5 to 0.5)
    reference = [lp.detach() + torch.linspace(-0.5, 0.5, len(lp)) for lp in direct]
    completions, tokens = len(SEQUENCES) + 1, sum(len(c) for _, c in SEQUENCES) + 3
    batch = _packed(SEQUENCES, ADVANTAGES, completions, tokens, torch.cat(reference) if beta else None)
    objective = GRPOObjective([], group_size=2, max_new_tokens=MAX_NEW, temperature=temperature, loss=kind,
                              beta=beta)
    params = _trainable(model)
    loss, stats = _objective_loss(objective, model, batch, [completions, tokens])
    grads = torch.autograd.grad(loss, params)
    want = _direct_loss(kind, direct, ADVANTAGES, reference, beta, completions, tokens, MAX_NEW)
    want_grads = torch.autograd.grad(want, params)
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-6)
    if beta:
        assert abs(float(want.detach())) > 1e-2  # the value compared is not a trivial 0
    for name, got, expected in zip([n for n, p in model.named_parameters() if p.requires_grad], grads, want_grads):
        assert float(expected.abs().max()) > 0, name
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)
    assert stats["clipped"] == 0.0  # one update per rollout: ratio 1, nothing clipped


def _fake_rollouts():
    """Three prompts x group 3 of hand-made answers (lengths 1-5, 22 tokens), rewards with the middle group flat
    and, in the first, a completion whose reward is its group's mean (advantage 0 too)."""
    prompts = [TokenizedPrompt(f"prompts.jsonl line {i + 1}", ids, "p", {})
               for i, ids in enumerate([[5, 17, 33], [9, 8, 7, 6, 90], [60, 61]])]
    tokens = [[40, 41, 42], [43], [44, 45, 46, 47, 48], [100, 101], [102], [103, 104, 105], [62, 63, 64, 65],
              [66], [67, 68]]
    answers = [Answer("", t, "end") for t in tokens]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.3, 0.3, 0.3, 0.0, 2.0, 1.5])
    return prompts, answers, rewards


def test_rollout_batch_packs_prompt_and_completion_and_skips_zero_advantages(policy):
    """_rollout_batch with beta > 0 is the batch written out (exact); with beta = 0 it leaves out the completions
    of advantage 0 (the flat group's, and one at its group's mean) yet counts them (completions and tokens)."""
    prompts, answers, rewards = _fake_rollouts()
    advantages, flat = group_advantages(rewards, 3)
    assert flat.tolist() == [False, True, False]
    sequences = [(prompts[i // 3].input_ids, a.tokens) for i, a in enumerate(answers)]
    for beta in (0.1, 0.0):
        objective = GRPOObjective([], group_size=3, max_new_tokens=5, beta=beta)
        objective.pad_id = 0
        batch = objective._rollout_batch(prompts, answers, advantages)
        keep = [i for i in range(9) if beta or i not in (2, 3, 4, 5)]
        want = _packed([sequences[i] for i in keep], advantages[keep].tolist())
        for name in ("input_ids", "labels", "position_ids", "sequences", "advantages"):
            assert torch.equal(getattr(batch, name), getattr(want, name)), (beta, name)
        assert (batch.completions, batch.completion_tokens) == (9, sum(len(a.tokens) for a in answers))


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo"])
def test_skipping_zero_advantage_completions_changes_nothing(policy, kind):
    """beta = 0: the batch without the completions of advantage 0 (as _rollout_batch makes it) gives the loss and
    gradient of the batch that holds them, with the same normalisers (fp32: loss 1e-6; gradients rtol 1e-5,
    atol 1e-6: the packed rows differ, so the sums run in another order — measured up to 2.2e-7 with 2 threads)."""
    model, _ = policy
    prompts, answers, rewards = _fake_rollouts()
    advantages, _ = group_advantages(rewards, 3, scale=kind != "dr_grpo")
    objective = GRPOObjective([], group_size=3, max_new_tokens=5, loss=kind, beta=0.0)
    objective.pad_id = 0
    skipped = objective._rollout_batch(prompts, answers, advantages)
    whole = _packed([(prompts[i // 3].input_ids, a.tokens) for i, a in enumerate(answers)], advantages.tolist())
    assert skipped.advantages.numel() == 5 and whole.advantages.numel() == 9
    counts = objective.counts(skipped)
    assert counts == objective.counts(whole) == [9, 22]
    params = _trainable(model)
    results = []
    for batch in (skipped, whole):
        loss, _ = _objective_loss(objective, model, batch, counts)
        results.append((float(loss.detach()), torch.autograd.grad(loss, params)))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_micro_batch_of_nothing_but_flat_groups_trains_nothing(policy):
    """beta = 0 and every advantage 0: a placeholder batch (no sequences), still counting its completions; its
    loss is 0 with a graph (zero gradients), and it adds nothing to the stats."""
    model, _ = policy
    prompts, answers, _ = _fake_rollouts()
    objective = GRPOObjective([], group_size=3, max_new_tokens=5, beta=0.0)
    objective.pad_id = 0
    batch = objective._rollout_batch(prompts, answers, torch.zeros(9))
    assert batch.placeholder and batch.advantages.numel() == 0 and objective.counts(batch) == [9, 22]
    loss, stats = _objective_loss(objective, model, batch, [9, 22])
    assert float(loss.detach()) == 0.0 and loss.requires_grad and stats == {"clipped": 0.0, "kl": 0.0}
    grads = torch.autograd.grad(loss, _trainable(model), allow_unused=True)
    assert all(g is None or not bool(g.any()) for g in grads)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _restore(params, saved):
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo"])
def test_accumulated_micro_batches_equal_one_batch(policy, kind):
    """TrainStep over 2 micro-batches (the prompts split 2 + 1, their counts summed) against 1 micro-batch that
    holds them all, beta 0.1 with the reference of _reference: the same loss (1e-6) and the same update of plain
    SGD at lr 1, i.e. the same gradient (rtol 1e-5, atol 1e-6: fp32 sums in another order, measured up to 1.8e-7
    on one element of 256 with 2 threads; a wrong normaliser is off by a factor of the whole gradient)."""
    from qlorakit.train import TrainStep

    model, _ = policy
    prompts, answers, rewards = _fake_rollouts()
    advantages, _ = group_advantages(rewards, 3, scale=kind != "dr_grpo")
    objective = GRPOObjective([], group_size=3, max_new_tokens=5, loss=kind, beta=0.1)
    objective.pad_id, objective.model, objective.device = 0, model, torch.device("cpu")
    one = [objective._rollout_batch(prompts, answers, advantages)]
    two = [objective._rollout_batch(prompts[:2], answers[:6], advantages[:6]),
           objective._rollout_batch(prompts[2:], answers[6:], advantages[6:])]
    objective._reference(one)
    objective._reference(two)
    params = _trainable(model)
    saved = _snapshot(params)
    results = []
    try:
        for batches in (one, two):
            step = TrainStep(model, optimizer=torch.optim.SGD(params, lr=1.0), max_grad_norm=None,
                             objective=objective)
            result = step.run(batches)
            results.append((result, [s - p.detach() for s, p in zip(saved, params)]))
            _restore(params, saved)
    finally:
        _restore(params, saved)
    (a, grads_a), (b, grads_b) = results
    assert b.loss == pytest.approx(a.loss, abs=1e-6)
    assert b.stats["kl"] == pytest.approx(a.stats["kl"], rel=1e-5) and a.stats["kl"] > 0
    assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5) and a.grad_norm > 0
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo"])
def test_a_run_with_accumulation_equals_one_big_batch(tmp_path, tiny_model_dir, files, kind):
    """8 prompts a step, as 1 micro-batch of 8 or 2 micro-batches of 4 (generated together, then trained one by
    one): the same completions (rewards, lengths ==), losses (1e-6), gradient norms (rel 1e-5) and adapter (atol
    1e-3 = 2% of lr: AdamW's first steps move an element by about lr whatever its gradient's size, so an element
    whose gradient is ~0 moves by an amount that rounding decides; every other element agrees to ~1e-6)."""
    from safetensors.torch import load_file

    settings = dict(reward=[_spec(files)], max_steps=2, loss=kind, lr=5e-2)
    data = files / "prompts.jsonl"
    one = _grpo(tiny_model_dir, data, tmp_path / "one", batch_size=8, **settings)
    two = _grpo(tiny_model_dir, data, tmp_path / "two", batch_size=4, grad_accum=2, **settings)
    for a, b in zip(_steps(one), _steps(two), strict=True):
        for key in ("reward", "reward_std", "completion_length", "zero_std_groups"):
            assert b[key] == a[key], key
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5) and a["grad_norm"] > 0
    first, second = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(
        tmp_path / "two" / "adapter_model.safetensors")
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=1e-3, msg=name)


def _split(batch):
    """(input ids, labels) of each sequence of a packed RolloutBatch, by its `sequences` row."""
    owner = batch.sequences[0]
    return [(batch.input_ids[0][owner == k].tolist(), batch.labels[0][owner == k].tolist())
            for k in range(int(owner.max()) + 1)]


def test_collect_turns_prompts_into_scored_rollouts(policy, files):
    """collect on 2 micro-batches of 2 prompts, group 4, beta 0.1: each micro-batch holds its prompts' completions,
    each sequence its prompt's ids then a completion's tokens (the labels, exactly), with its reference (one value
    per completion token); the advantages are group_advantages of the reward recomputed from the decoded
    completions (1e-6). The metrics: reward mean and std over the step's completions, per reward, completion
    length, truncated, zero_std_groups (1e-6). With beta 0 (same seed) the same completions, less those of
    advantage 0, which are still counted. The same step samples the same completions again (==); the next step
    samples others."""
    from types import SimpleNamespace

    from qlorakit.data.prompts import PromptBatch
    from qlorakit.generation import stop_ids
    from qlorakit.rewards import parse_rewards

    model, tokenizer = policy
    rows = _rows(4)
    items = [TokenizedPrompt(f"prompts.jsonl line {i + 1}", encode_text(tokenizer, r["prompt"])[0], r["prompt"],
                             {"answer": r["answer"], "id": r["id"]}) for i, r in enumerate(rows)]
    g, max_new = 4, 4
    prompt_batches = [PromptBatch(items[:2]), PromptBatch(items[2:])]
    spread = parse_rewards([_spec(files)])[0].fn
    ends = set(stop_ids(tokenizer))

    def objective_of(beta):
        objective = GRPOObjective(parse_rewards([_spec(files)]), group_size=g, max_new_tokens=max_new, beta=beta,
                                  seed=3)
        config = SimpleNamespace(batch_size=2, grad_accum=2, packing=True, adapter=None)
        objective.prepare(model, tokenizer, None, 0, config, None, None, False, None, lambda *a: None)
        return objective

    objective = objective_of(0.1)
    batches, metrics = objective.collect(model, prompt_batches, step=1)
    assert len(batches) == 2
    rewards, lengths, truncated, flat_groups = [], [], [], 0
    for batch, prompts in zip(batches, (items[:2], items[2:])):
        sequences = _split(batch)
        assert batch.completions == len(sequences) == 2 * g
        completions = []
        for k, (ids, labels) in enumerate(sequences):
            prompt = prompts[k // g].input_ids
            assert ids[:len(prompt)] == prompt
            completion = ids[len(prompt):]
            assert labels == [IGNORE_INDEX] * len(prompt) + completion and 1 <= len(completion) <= max_new
            completions.append(completion)
        assert batch.completion_tokens == batch.reference.numel() == sum(map(len, completions))
        scores = torch.tensor(spread(None, [tokenizer.decode(c, skip_special_tokens=True) for c in completions],
                                     None))
        want, flat = group_advantages(scores, g)
        torch.testing.assert_close(batch.advantages, want, rtol=1e-6, atol=1e-6)
        rewards += scores.tolist()
        lengths += [len(c) for c in completions]
        truncated += [len(c) == max_new and c[-1] not in ends for c in completions]
        flat_groups += int(flat.sum())
    n = len(rewards)
    mean = sum(rewards) / n
    assert metrics["reward"] == pytest.approx(mean, abs=1e-6)
    assert metrics[f"reward/{_spec(files)}"] == pytest.approx(mean, abs=1e-6)
    unbiased = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))  # (as TRL's reward_std)
    assert metrics["reward_std"] == pytest.approx(unbiased, abs=1e-6)
    assert metrics["completion_length"] == pytest.approx(sum(lengths) / n, abs=1e-6)
    assert metrics["truncated"] == pytest.approx(sum(truncated) / n, abs=1e-6)
    assert metrics["zero_std_groups"] == pytest.approx(flat_groups / 4, abs=1e-6)
    assert metrics["generation_s"] > 0 and metrics["rollout_tokens_per_s"] > 0

    skipping, _ = objective_of(0.0).collect(model, prompt_batches, step=1)
    for whole, batch in zip(batches, skipping):
        keep = [k for k, a in enumerate(whole.advantages.tolist()) if a != 0]
        assert batch.reference is None
        assert (batch.completions, batch.completion_tokens) == (whole.completions, whole.completion_tokens)
        if keep:
            assert [_split(whole)[k] for k in keep] == _split(batch)
            assert batch.advantages.tolist() == [whole.advantages[k].item() for k in keep]
        else:
            assert batch.placeholder

    again, _ = objective.collect(model, prompt_batches, step=1)
    for a, b in zip(batches, again):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.advantages, b.advantages)
    other, _ = objective.collect(model, prompt_batches, step=2)
    assert any(a.input_ids.shape != b.input_ids.shape or not torch.equal(a.input_ids, b.input_ids)
               for a, b in zip(batches, other))


# ---------------------------------------------------------------------------------------------- the reference


def test_reference_is_the_model_with_adapters_disabled_and_kl_is_k3(policy):
    """_reference's values are the completions' log-probabilities under model.disable_adapter() from each
    sequence's own forward (temperature 0.7; fp32, 1e-5), visibly not the policy's; the loss's KL stat is the sum
    of exp(ref - logp) - (ref - logp) - 1 over the tokens, and summary() divides it by the step's tokens (1e-5)."""
    model, _ = policy
    temperature, beta = 0.7, 0.05
    objective = GRPOObjective([], group_size=2, max_new_tokens=MAX_NEW, temperature=temperature, beta=beta)
    objective.model, objective.device = model, torch.device("cpu")
    batch = _packed(SEQUENCES, ADVANTAGES)
    objective._reference([batch])
    with torch.no_grad():
        with model.disable_adapter():
            reference = _direct_logps(model, SEQUENCES, temperature)
        policy_logps = _direct_logps(model, SEQUENCES, temperature)
    torch.testing.assert_close(batch.reference, torch.cat(reference), rtol=1e-5, atol=1e-5)
    assert float((torch.cat(policy_logps) - batch.reference).abs().max()) > 1e-2  # adapters were off

    tokens = batch.completion_tokens
    with torch.no_grad():
        loss, stats = _objective_loss(objective, model, batch, [batch.completions, tokens])
    log_ratio = torch.cat(reference).double() - torch.cat(policy_logps).double()
    want = float((log_ratio.exp() - log_ratio - 1).sum())
    assert want > 1e-3
    assert stats["kl"] == pytest.approx(want, rel=1e-5)
    assert objective.summary(stats, [batch.completions, tokens])["kl"] == pytest.approx(want / tokens, rel=1e-5)
    assert "kl" not in GRPOObjective([], beta=0.0).summary({"clipped": 0.0, "kl": 0.0}, [4, 13])


def test_reference_keeps_the_models_mode(policy):
    model, _ = policy
    objective = GRPOObjective([], group_size=2, max_new_tokens=MAX_NEW, beta=0.1)
    objective.model, objective.device = model, torch.device("cpu")
    for mode in (True, False):
        model.train(mode)
        objective._reference([_packed(SEQUENCES, ADVANTAGES)])
        assert model.training is mode
    model.train()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_a_run_with_beta_logs_kl_from_zero(tmp_path, tiny_model_dir, files, quant):
    """beta > 0 (fp32): every step has 'kl'; fresh adapters (B = 0) make the policy the model with its adapters
    disabled, so at step 1 the reference is the policy and kl is 0 (1e-6) — on either quantization: the reference
    must compute the base as the policy does; the updates then move it away (kl > 0, finite)."""
    run = _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "kl", quant=quant, reward=[_spec(files)],
                beta=0.04, max_steps=3, lr=5e-2)
    steps = _steps(run)
    assert all("kl" in r and math.isfinite(r["kl"]) for r in steps)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["kl"] > 1e-6


def test_a_continued_adapter_is_its_own_kl_reference(tmp_path, tiny_model_dir, files):
    """--adapter with beta > 0: the reference is the adapter as the run starts (as TRL's GRPOTrainer makes it), not
    the base, so at step 1 kl is 0 (1e-6), where the base as reference gives kl > 0.01 — and the adapter's starting
    weights are back in place for the policy after each reference pass (the run moves on)."""
    first = _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "first", reward=[_spec(files)], max_steps=3,
                  lr=5e-2)
    run = _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "kl", reward=[_spec(files)], beta=0.04,
                max_steps=2, lr=5e-2, adapter=str(first.output))
    steps = _steps(run)
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[-1]["kl"] > 1e-6
    from qlorakit.grpo import GRPOObjective

    original = GRPOObjective._started
    try:  # the base as reference instead: what the run computed before
        GRPOObjective._started = lambda self: qlorakit.upstream.peft.base_only(self.model)
        against_base = _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "base-ref", reward=[_spec(files)],
                             beta=0.04, max_steps=1, adapter=str(first.output))
    finally:
        GRPOObjective._started = original
    assert _steps(against_base)[0]["kl"] > 0.01


def test_padded_rollouts_train_as_packed_ones(tmp_path, tiny_model_dir, files):
    """--no-packing: the rollouts are right-padded rows (each completion its own row) and the run's losses, rewards
    and gradient norms equal the packed run's (fp32, 1e-5: the same sums in another layout)."""
    packed = _steps(_grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "packed", reward=[_spec(files)],
                          beta=0.04))
    padded = _steps(_grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "padded", reward=[_spec(files)],
                          beta=0.04, packing=False))
    for a, b in zip(packed, padded, strict=True):
        for key in ("loss", "grad_norm", "reward", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        assert a["tokens"] == b["tokens"]  # (real tokens: padding is not counted)


def test_an_overlong_margin_past_the_completion_is_refused(tmp_path, files):
    with pytest.raises(qlorakit.ConfigError, match=r"^--reward overlong:8: the penalty would start 8 tokens before "
                                                   r"--max-new-tokens 8, at or before the first token"):
        qlorakit.train_grpo(data=str(files / "prompts.jsonl"), reward=["overlong:8"], max_new_tokens=8,
                            model=str(tmp_path / "absent"), output=str(tmp_path / "out"), **QUIET)


@pytest.mark.parametrize("reward", [5, {"exact": "answer"}, [3]])
def test_a_yaml_reward_of_another_type_is_refused_by_name(tmp_path, reward):
    config = tmp_path / "grpo.yaml"
    config.write_text(json.dumps({"reward": reward}))  # (JSON is YAML)
    with pytest.raises(qlorakit.ConfigError, match=rf"^{config}: reward=.*: give one or more reward specs as strings"):
        qlorakit.GRPOConfig.build(config)


def test_resume_compares_reward_weights_as_numbers(tmp_path, tiny_model_dir, files):
    """Weights written "1,.5" resume a run started with [1, 0.5]; other weights are refused."""
    rewards = [_spec(files), "exact:answer"]
    _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "run", reward=rewards, reward_weights=[1, 0.5],
          max_steps=2, save_every=1)
    run = _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "run", reward=rewards, reward_weights="1, .5",
                max_steps=3, save_every=1, resume=True)
    assert [r["step"] for r in _steps(run)] == [1, 2, 3]
    with pytest.raises(qlorakit.TrainingError, match="--resume with reward_weights='1,0.4'"):
        _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "run", reward=rewards, reward_weights="1,0.4",
              max_steps=4, resume=True)


# ---------------------------------------------------------------------------------------------- learning


def test_a_reward_on_a_token_raises_its_probability(tmp_path, tiny_model_dir, monkeypatch):
    """A user reward (a module imported by name from the current directory) pays 1 when the completion starts
    with the target word. Target and prompts are chosen from the untrained model: the word with 5-50% probability
    after the most prompts. After 6 steps (lr 2e-2, group 8) the mean probability of the word at the first
    completion position has risen by more than 0.3 (and doubled), and the logged reward rose by more than 0.3."""
    model, tokenizer = qlorakit.load(tiny_model_dir, quant="nf4", dtype="fp32", device="cpu")
    rng = random.Random(0)
    candidates = [" ".join(f"w{rng.randrange(10, 250)}" for _ in range(4)) for _ in range(200)]

    def first_token_probs(m, prompts):
        m.eval()
        with torch.no_grad():
            return torch.stack([m(torch.tensor([encode_text(tokenizer, p)[0]])).logits[0, -1].float().softmax(-1)
                                for p in prompts])

    probs = first_token_probs(model, candidates)
    moderate = (probs > 0.05) & (probs < 0.5)
    moderate[:, :4] = False  # not a special token
    target = int(moderate.sum(0).argmax())
    prompts = [c for c, ok in zip(candidates, moderate[:, target].tolist()) if ok][:8]
    assert len(prompts) == 8
    word = tokenizer.convert_ids_to_tokens(target)
    name = f"first_word_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def score(prompts, completions, rows):\n"
        f"    return [1.0 if c.split()[:1] == [{word!r}] else 0.0 for c in completions]\n", encoding="utf-8")
    data = _write_rows(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    monkeypatch.chdir(tmp_path)
    before = float(first_token_probs(model, prompts)[:, target].mean())
    run = qlorakit.train_grpo(loaded=(model, tokenizer), data=str(data), reward=[f"{name}:score"],
                              output=str(tmp_path / "out"), rank=4, alpha=8, batch_size=4, group_size=8,
                              max_new_tokens=2, max_length=32, lr=2e-2, max_steps=6, schedule="constant",
                              warmup_steps=0, **QUIET)
    after = float(first_token_probs(run.model, prompts)[:, target].mean())
    assert after > before + 0.3 and after > 2 * before, (before, after)
    rewards = [r["reward"] for r in _steps(run)]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.3, rewards
    assert all(r[f"reward/{name}:score"] == r["reward"] for r in _steps(run))  # one reward, weight 1
    sys.modules.pop(name, None)


def test_flat_rewards_teach_nothing(tmp_path, tiny_model_dir, files):
    """A reward that is the same for every completion (regex:.* is 1.0 for any text): every group is flat, so
    every step's loss and gradient are 0 (exact) and the adapter stays where it started (LoRA B exactly 0)."""
    run = _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "flat", reward=["regex:.*"], max_steps=2)
    for r in _steps(run):
        assert r["reward"] == 1.0 and r["reward_std"] == 0.0 and r["zero_std_groups"] == 1.0
        assert r["loss"] == 0.0 and r["grad_norm"] == 0.0
    assert all(bool((p == 0).all()) for n, p in run.model.named_parameters() if "lora_B" in n)


def test_message_prompts_use_the_chat_template_and_reach_the_reward_as_messages(tmp_path):
    """Prompts given as messages: the run tokenizes them with the chat template (a ChatML tokenizer over the tiny
    vocabulary) and a reward function receives each as the list of messages it was, its row's other fields
    beside it; the run trains (finite loss, the adapter moved)."""
    from conftest import CHATML, chat_tokenizer, save_tiny_model

    tokenizer = chat_tokenizer(CHATML)
    model_dir = save_tiny_model(tmp_path / "chat-model", vocab_size=len(tokenizer))
    rows = [{"prompt": [{"role": "system", "content": "w5 w6"}, {"role": "user", "content": r["prompt"]}],
             "id": r["id"]} for r in _rows(4)]
    data = _write_rows(tmp_path / "chat.jsonl", rows)
    (tmp_path / "chat_reward.py").write_text(
        "def score(prompts, completions, rows):\n"
        "    for prompt, row in zip(prompts, rows):\n"
        "        if not (isinstance(prompt, list) and [m['role'] for m in prompt] == ['system', 'user']):\n"
        "            raise TypeError(f'not the messages: {prompt!r}')\n"
        "        if set(row) != {'id'}:\n"
        "            raise TypeError(f'not the row: {row!r}')\n"
        "    return [float(len(c.split()) % 3) for c in completions]\n", encoding="utf-8")
    model, _ = qlorakit.load(model_dir, quant="nf4", dtype="fp32", device="cpu")
    lines = []
    run = qlorakit.train_grpo(loaded=(model, tokenizer), data=str(data),
                              reward=[f"{tmp_path / 'chat_reward.py'}:score"], output=str(tmp_path / "out"),
                              rank=4, alpha=8, batch_size=4, group_size=4, max_new_tokens=4, max_length=64,
                              lr=2e-2, max_steps=2, log=lines.append, progress=False)
    # the prompts' tokens are the template's, with the generation prompt (the data line reports their count)
    from qlorakit.data.tokenize import encode_chat

    expected = sum(len(encode_chat(tokenizer, r["prompt"], True)[1]) for r in rows)
    assert any(line.startswith("data:") and f"4 prompts, {expected} tokens" in line for line in lines), lines
    assert all(math.isfinite(r["loss"]) for r in _steps(run))
    assert any(float(p.detach().abs().max()) > 0 for n, p in run.model.named_parameters() if "lora_B" in n)


# ---------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype, quant", [(d, "nf4") for d in DTYPES] + [("fp16", "int8")])
def test_precision_matrix(tmp_path, tiny_model_dir, files, dtype, quant):
    """Each compute dtype on nf4 (and int8 under fp16): the run completes; adapters in the policy's dtype (fp16:
    fp32 adapters and a GradScaler, whose 'scale' is in every step's metrics; bf16: bf16 adapters); every metric
    finite; the adapters moved (LoRA B starts at 0)."""
    run = _grpo(tiny_model_dir, files / "prompts.jsonl", tmp_path / "run", dtype=dtype, quant=quant,
                reward=[_spec(files)], max_steps=3)
    assert {p.dtype for p in run.model.parameters() if p.requires_grad} == {EXPECTED_ADAPTER[dtype]}
    steps = _steps(run)
    assert len(steps) == 3
    assert all(("scale" in r) == (dtype == "fp16") for r in steps)
    for r in steps:
        for key in ("loss", "grad_norm", *ROLLOUT_KEYS):
            assert math.isfinite(r[key]), (key, r)
    moved = [float(p.detach().abs().max()) for n, p in run.model.named_parameters() if "lora_B" in n]
    assert moved and max(moved) > 0


# ---------------------------------------------------------------------------------------------- resume


def test_resume_is_exact(tmp_path, tiny_model_dir, files):
    """4 steps (dropout 0.1), checkpointed at step 2, the end forgotten as if the process had died after the
    checkpoint, resumed: steps 3 and 4 sample the same completions (same rewards, ==) and give the same losses
    (==) and a bitwise-equal adapter as the uninterrupted run."""
    from safetensors.torch import load_file

    settings = dict(reward=[_spec(files)], max_steps=4, dropout=0.1, lr=5e-2)
    data = files / "prompts.jsonl"
    whole = _grpo(tiny_model_dir, data, tmp_path / "whole", **settings)
    _grpo(tiny_model_dir, data, tmp_path / "cut", save_every=2, **settings)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (tmp_path / "cut" / name).unlink()
    lines = []
    resumed = _grpo(tiny_model_dir, data, tmp_path / "cut", save_every=2, resume=True, log=lines.append, **settings)
    assert any("resumed from" in line and "step-000002" in line for line in lines), lines
    a, b = {r["step"]: r for r in _steps(whole)}, {r["step"]: r for r in _steps(resumed)}
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward", "reward_std", "completion_length", "loss", "grad_norm", "clip_fraction",
                    "zero_std_groups"):
            assert b[step][key] == a[step][key], (step, key)
    assert a[4]["grad_norm"] > 0  # the steps compared trained
    full, again = load_file(tmp_path / "whole" / "adapter_model.safetensors"), load_file(
        tmp_path / "cut" / "adapter_model.safetensors")
    assert full.keys() == again.keys()
    for name in full:
        assert torch.equal(full[name], again[name]), name
    # a resume must keep the rollouts' settings: another group size or reward is refused, naming both
    with pytest.raises(qlorakit.TrainingError, match=r"--resume with group_size=8, but the run was started with "
                                                     r"group_size=4"):
        _grpo(tiny_model_dir, data, tmp_path / "cut", save_every=2, resume=True, **(settings | {"group_size": 8}))
    with pytest.raises(qlorakit.TrainingError, match=r"--resume with reward=\['exact:answer'\], but the run was "
                                                     r"started with reward="):
        _grpo(tiny_model_dir, data, tmp_path / "cut", save_every=2, resume=True,
              **(settings | {"reward": ["exact:answer"]}))
    with pytest.raises(qlorakit.TrainingError, match=r"the run there is a GRPO run \(qlorakit grpo\)"):
        qlorakit.train(data=str(data), output=str(tmp_path / "cut"), resume=True, **QUIET)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name, message", [
    ("boom", r"reward .*rewards\.py:boom raised ValueError: 'no score for id 2' on prompts\.jsonl line 3 "
             r"\(completion "),
    ("not_a_number", r"reward .*rewards\.py:not_a_number returned nan \(float\) for prompts\.jsonl line 3 "
                     r"\(completion .*every value must be a finite number"),
    ("one_short", r"reward .*rewards\.py:one_short returned 15 values for 16 completions \(prompts\.jsonl line "),
])
def test_a_failing_reward_function_is_named_with_its_row(tmp_path, tiny_model_dir, files, name, message):
    """Step 1 holds all 4 prompts (x group 4): the failure names the reward, the row (file and line) and the
    completion, or the counts."""
    data = _write_rows(tmp_path / "prompts.jsonl", _rows(4))
    with pytest.raises(RewardError, match=message):
        _grpo(tiny_model_dir, data, tmp_path / "out", reward=[_spec(files, name)], max_steps=1)


@pytest.fixture
def no_model_load(monkeypatch):
    """A run that loads the model fails the test: what these refuse is refused before the minutes of loading."""
    monkeypatch.setattr(importlib.import_module("qlorakit.train"), "load",
                        lambda *a, **k: pytest.fail("the model was loaded"))


def test_a_missing_field_is_refused_before_the_model_loads(tmp_path, no_model_load):
    """A built-in reading a field that row 3 lacks: DataError naming the line and the field, with a model path
    that does not exist (and loading made to fail) — the data is checked first."""
    rows = _rows(5)
    del rows[2]["answer"]
    data = _write_rows(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(qlorakit.DataError, match=r"prompts\.jsonl line 3: no field 'answer' for the reward "
                                                 r"exact:answer \(fields present: 'id'\)"):
        qlorakit.train_grpo(model=str(tmp_path / "no-such-model"), data=str(data), reward=["exact:answer"],
                            output=str(tmp_path / "out"), **QUIET)


def test_sft_data_and_prompt_data_are_each_refused_by_the_other_command(tmp_path, files, no_model_load):
    sft = _write_rows(tmp_path / "sft.jsonl", [{"prompt": "w10 w11", "completion": "w12"}])
    with pytest.raises(qlorakit.DataError, match=r"sft\.jsonl.*the data reads as prompt-completion data, and GRPO "
                                                 r"needs prompts.*--field prompt=COLUMN"):
        qlorakit.train_grpo(data=str(sft), reward=["exact:answer"], output=str(tmp_path / "a"), **QUIET)
    with pytest.raises(qlorakit.DataError, match=r"prompts\.jsonl.*the rows hold prompts without answers; train on "
                                                 r"them with `qlorakit grpo`"):
        qlorakit.train(data=str(files / "prompts.jsonl"), output=str(tmp_path / "b"), **QUIET)


@pytest.mark.parametrize("settings, error, message", [
    ({}, qlorakit.ConfigError, r"no reward: pass --reward SPEC"),
    ({"group_size": 1}, qlorakit.ConfigError, r"group_size=1: advantages compare the completions of a prompt, so a "
                                              r"group needs at least 2"),
    ({"on_long": "truncate"}, qlorakit.ConfigError, r"on_long='truncate': a prompt is never truncated.*use drop or "
                                                    r"error"),
    ({"fsdp": True}, qlorakit.ConfigError, r"fsdp=True does not apply to GRPO: generation reads each layer's whole "
                                           r"weights"),
    ({"train_on": "all"}, qlorakit.ConfigError, r"train_on='all' does not apply to GRPO"),
    ({"max_new_tokens": 32, "max_length": 32}, qlorakit.ConfigError, r"max_new_tokens=32 leaves no room for a "
                                                                     r"prompt in max_length=32"),
    ({"temperature": 0.0}, qlorakit.ConfigError, r"temperature=0"),
    ({"loss": "ppo"}, qlorakit.ConfigError, r"loss='ppo' is not a GRPO loss"),
])
def test_settings_that_do_not_fit_are_refused_before_the_model_loads(tmp_path, files, no_model_load, settings, error,
                                                                     message):
    settings = ({"reward": ["exact:answer"]} if settings else {}) | settings
    with pytest.raises(error, match=message):
        qlorakit.train_grpo(data=str(files / "prompts.jsonl"), output=str(tmp_path / "out"), **QUIET, **settings)


def test_a_config_of_another_command_is_refused():
    with pytest.raises(qlorakit.ConfigError, match=r"a GRPOConfig is the settings of `qlorakit grpo`; pass a "
                                                   r"TrainConfig"):
        qlorakit.train(qlorakit.GRPOConfig(data="x.jsonl", reward=["exact:answer"]), **QUIET)
    with pytest.raises(qlorakit.ConfigError, match=r"a TrainConfig is the settings of `qlorakit train`; pass a "
                                                   r"GRPOConfig"):
        qlorakit.train_grpo(qlorakit.TrainConfig(data="x.jsonl"), **QUIET)


# ---------------------------------------------------------------------------------------------- the command


def test_grpo_command_writes_the_run_and_its_metrics(tmp_path, tiny_model_dir, files, capsys):
    """`qlorakit grpo` with two weighted rewards and 2 of 8 prompts held out: the adapter, config.json (objective
    grpo), metrics.jsonl with every GRPO key on every step (the total reward the weighted sum of the per-reward
    means, 1e-6) and the held-out prompts' mean reward at the end, and loss.png."""
    from qlorakit.cli import main

    out = tmp_path / "run"
    spread = _spec(files)
    assert main(["grpo", "--model", str(tiny_model_dir), "--data", str(files / "prompts.jsonl"),
                 "--reward", "exact:answer", "--reward", spread, "--reward-weights", "1,0.5", "--group-size", "4",
                 "--max-new-tokens", "4", "--max-length", "32", "--batch-size", "4", "--max-steps", "2",
                 "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--dtype", "fp32", "--validation", "0.25",
                 "--output", str(out), "--quiet"]) == 0
    assert "adapter (PEFT format) written to" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "adapter_config.json", "config.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "grpo" and config["reward"] == ["exact:answer", spread]
    assert config["group_size"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for key in (*ROLLOUT_KEYS, "reward/exact:answer", "reward/exact:answer_std", f"reward/{spread}",
                    f"reward/{spread}_std"):
            assert key in r and math.isfinite(r[key]), key
        assert r["reward"] == pytest.approx(r["reward/exact:answer"] + 0.5 * r[f"reward/{spread}"], abs=1e-6)
        assert 0 < r["completion_length"] <= 4 and 0 <= r["truncated"] <= 1 and 0 <= r["zero_std_groups"] <= 1
        assert "kl" not in r  # beta 0
    # the held-out prompts' mean reward (greedy answers), overall and per reward, after the last step
    evaluated = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evaluated] == [2]
    final = evaluated[0]
    assert final["eval_reward"] == pytest.approx(
        final["eval_reward/exact:answer"] + 0.5 * final[f"eval_reward/{spread}"], abs=1e-6)


def _subcommand(name):
    import argparse

    from qlorakit.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_grpo_help_lists_its_flags_and_not_the_inapplicable_ones(capsys):
    from qlorakit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["grpo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--reward", "--reward-weights", "--group-size", "--max-new-tokens", "--temperature", "--beta",
                 "--loss", "--epsilon", "--epsilon-high", "--data", "--max-steps", "--resume"):
        assert flag in text, flag
    import argparse

    flags = {option for action in _subcommand("grpo")._actions for option in action.option_strings
             if action.help != argparse.SUPPRESS}  # (train's flags that do not apply: hidden, refused with why)
    assert {"--reward", "--group-size", "--beta", "--epsilon-high"} <= flags
    for flag in ("--train-on", "--streaming", "--fsdp"):
        assert flag not in flags, flag
        assert f"  {flag}" not in text, flag  # (the description may name them: not as flags)
    with pytest.raises(SystemExit) as e:
        main(["grpo", "--fsdp"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "qlorakit grpo: error: --fsdp does not apply to GRPO: generation reads each layer's whole weights, which "
        "FSDP shards across the processes; train on several processes without --fsdp (each holds the quantized "
        "base); leave it out")
    with pytest.raises(SystemExit):
        main(["grpo", "--train-on", "all"])
