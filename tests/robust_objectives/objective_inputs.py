"""Consistent inputs for every objective, built from a tiny 1-layer "policy".

Input embeddings E (2B, T, d) feed a linear head W (d, V); the policy's per-position log-softmax,
label log-probs, sequence log-probs and lengths all derive from E and W, as in the training stage,
so token-level objectives, WDPO's embedding penalty and the sequence-level objectives see one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robust_objectives import LISTWISE, ListwiseLogps, PreferenceLogps


@dataclass
class PairData:
    """Raw per-pair data; indexing it by a permutation permutes the pairs."""

    chosen_embeddings: torch.Tensor  # (B, T, d)
    rejected_embeddings: torch.Tensor  # (B, T, d)
    chosen_labels: torch.Tensor  # (B, T)
    rejected_labels: torch.Tensor  # (B, T)
    chosen_mask: torch.Tensor  # (B, T) bool
    rejected_mask: torch.Tensor  # (B, T) bool
    calibration: torch.Tensor  # (B,)

    def select(self, index) -> "PairData":
        return PairData(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def make_pair_data(batch: int = 4, *, seq: int = 5, vocab: int = 7, dim: int = 3, seed: int = 0,
                   dtype=torch.float64) -> PairData:
    g = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(2):
        mask = torch.rand(batch, seq, generator=g) > 0.3
        mask[:, 0] = True  # at least one response position per row
        masks.append(mask)
    return PairData(
        chosen_embeddings=torch.randn(batch, seq, dim, generator=g, dtype=dtype),
        rejected_embeddings=torch.randn(batch, seq, dim, generator=g, dtype=dtype),
        chosen_labels=torch.randint(vocab, (batch, seq), generator=g),
        rejected_labels=torch.randint(vocab, (batch, seq), generator=g),
        chosen_mask=masks[0],
        rejected_mask=masks[1],
        calibration=0.5 + 1.5 * torch.rand(batch, generator=g, dtype=dtype),
    )


def make_heads(vocab: int = 7, dim: int = 3, *, seed: int = 1, at_reference: bool = False, dtype=torch.float64):
    """Policy head (requires grad) and reference head (equal to it when at_reference)."""
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(dim, vocab, generator=g, dtype=dtype).requires_grad_()
    reference = policy.detach().clone() if at_reference else torch.randn(dim, vocab, generator=g, dtype=dtype)
    return policy, reference


def build_pair_inputs(data: PairData, policy_head: torch.Tensor, reference_head: torch.Tensor):
    """PreferenceLogps with every field filled, plus the embedding leaf (2B, T, d).

    policy_chosen_logps / policy_rejected_logps retain their grad for sign tests.
    """
    embeddings = torch.cat([data.chosen_embeddings, data.rejected_embeddings]).detach().requires_grad_()
    batch = data.chosen_embeddings.shape[0]
    policy_vocab = torch.log_softmax(embeddings @ policy_head, dim=-1)
    with torch.no_grad():
        reference_vocab = torch.log_softmax(embeddings @ reference_head, dim=-1)
    labels = torch.cat([data.chosen_labels, data.rejected_labels]).unsqueeze(-1)
    mask = torch.cat([data.chosen_mask, data.rejected_mask])
    policy_seq = (policy_vocab.gather(-1, labels).squeeze(-1) * mask).sum(-1)
    reference_seq = (reference_vocab.gather(-1, labels).squeeze(-1) * mask).sum(-1)
    policy_chosen, policy_rejected = policy_seq[:batch], policy_seq[batch:]
    if policy_seq.requires_grad:
        policy_chosen.retain_grad()
        policy_rejected.retain_grad()
    lengths = mask.sum(-1)
    inputs = PreferenceLogps(
        policy_chosen_logps=policy_chosen,
        policy_rejected_logps=policy_rejected,
        reference_chosen_logps=reference_seq[:batch],
        reference_rejected_logps=reference_seq[batch:],
        chosen_lengths=lengths[:batch],
        rejected_lengths=lengths[batch:],
        policy_chosen_vocab_logps=policy_vocab[:batch],
        policy_rejected_vocab_logps=policy_vocab[batch:],
        reference_chosen_vocab_logps=reference_vocab[:batch],
        reference_rejected_vocab_logps=reference_vocab[batch:],
        chosen_mask=data.chosen_mask,
        rejected_mask=data.rejected_mask,
        calibration=data.calibration,
        policy_input_embeddings=embeddings,
    )
    return inputs, embeddings


@dataclass
class ListData:
    policy_logps: torch.Tensor  # (B, K) leaf values (a fresh leaf is made per build)
    reference_logps: torch.Tensor  # (B, K)
    scores: torch.Tensor  # (B, K)
    calibration: torch.Tensor  # (B, K)

    def select(self, index) -> "ListData":
        return ListData(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def make_list_data(batch: int = 4, *, k: int = 3, seed: int = 0, at_reference: bool = False,
                   dtype=torch.float64) -> ListData:
    g = torch.Generator().manual_seed(seed)
    reference = -5.0 + torch.randn(batch, k, generator=g, dtype=dtype)
    shift = torch.randn(batch, k, generator=g, dtype=dtype)
    policy = reference.clone() if at_reference else reference + 2.0 * shift
    scores = torch.stack([torch.randperm(k, generator=g) for _ in range(batch)]).to(dtype)
    calibration = 0.5 + 1.5 * torch.rand(batch, k, generator=g, dtype=dtype)
    return ListData(policy, reference, scores, calibration)


def build_list_inputs(data: ListData):
    policy = data.policy_logps.detach().clone().requires_grad_()
    inputs = ListwiseLogps(
        policy_logps=policy,
        reference_logps=data.reference_logps,
        scores=data.scores,
        calibration=data.calibration,
    )
    return inputs, policy


def make_inputs(name: str, batch: int = 4, *, seed: int = 0, at_reference: bool = False):
    """Inputs for objective `name` and the tensor whose .grad the tests inspect."""
    if name in LISTWISE:
        return build_list_inputs(make_list_data(batch, seed=seed, at_reference=at_reference))
    heads = make_heads(seed=seed + 1, at_reference=at_reference)
    return build_pair_inputs(make_pair_data(batch, seed=seed), *heads)
