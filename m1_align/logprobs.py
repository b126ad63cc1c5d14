"""Token log-probabilities of a causal LM under the trainer: what every loss that scores tokens starts from.

`causal_lm_logprobs` packs several sequences into one row (no attention across them), runs the output
head in checkpointed chunks so a [tokens, vocab] matrix is never held for the whole batch, and returns
log pi(y_t | y_<t) at temperature T (the distribution that was sampled) with the entropy beside it.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DeepSpeedEngine (a PeftModel forwards attributes itself)
        model = model.module
    return model


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: sample indices per packed row, each row at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


LOGIT_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")  # Cohere, Granite, ...


def rescales_logits(config) -> bool:
    """Whether a model's forward changes the output layer's logits after it (softcapping or a multiplier)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "final_logit_softcapping", None)) or any(
        getattr(text, name, None) not in (None, 1, 1.0) for name in LOGIT_MULTIPLIERS)


def output_head(model) -> torch.nn.Module:
    """The (wrapped) model's output layer, hidden states -> logits. Log-probs apply it to the decoder's final
    hidden states themselves, so a model whose forward changes the logits after it is refused."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if config is not None and rescales_logits(config):
        raise ValueError(f"{config.model_type}: its forward rescales the output layer's logits (final_logit_softcapping "
                         f"or one of {', '.join(LOGIT_MULTIPLIERS)}), which m1-align's log-prob path does not apply; "
                         "use a model without it")
    return inner.get_output_embeddings()


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H], from a forward through the (wrapped) model with the head
    on one position only: DDP and DeepSpeed see an ordinary forward."""
    inner = _unwrap(model)
    captured = []
    handle = inner.get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def checkpointed_chunks(scores, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """scores(h [n, H], y [n]) -> [k, n], applied `chunk_tokens` tokens at a time and concatenated, each chunk
    but the last under activation checkpointing when grad is on: backward recomputes a chunk's [n, V] logits
    instead of keeping every chunk's. The last chunk keeps its own: backward starts with it, so a recomputed
    copy would be held at about the same moment anyway, and recomputing it (for most batches the only chunk)
    costs a head forward (its logits live longer only where other work runs before backward: PPO's critic
    forward). No tokens: one empty chunk still runs, so the result stays connected to the graph (a
    micro-batch without a scored token backpropagates zeros instead of failing)."""
    parts = []
    total = max(targets.numel(), 1)
    for begin in range(0, total, chunk_tokens):
        h, y = hidden[begin : begin + chunk_tokens], targets[begin : begin + chunk_tokens]
        if torch.is_grad_enabled() and begin + chunk_tokens < total:
            parts.append(torch.utils.checkpoint.checkpoint(scores, h, y, use_reentrant=False))
        else:
            parts.append(scores(h, y))
    return torch.cat(parts, dim=1)


def causal_lm_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, temperature: float = 1.0,
                       position_ids: torch.Tensor | None = None, with_raw: bool = False, with_entropy: bool = False,
                       chunk_tokens: int = 512, pack: bool = False):
    """Log-probs of the tokens in columns start.. (position t predicts token t+1): (log pi_T [B, T-start],
    entropy of pi_T or None, temperature-1 log-probs or None), pi_T = softmax(logits / T), all float32.

    The [B, T, V] logits are never built: the final hidden states come from the decoder (final_hidden_states)
    and the output head is applied `chunk_tokens` positions at a time, only where a real token is scored,
    under activation checkpointing so backward recomputes each chunk but the last instead of keeping its logits.
    pack=True drops the padding from the forward too: each row's real tokens (mask 1, left or right
    padding) are packed first-fit into rows no longer than the longest sample, with positions restarting
    at 0 per sample and no attention mask, which transformers' causal masks and the hybrid model read as
    separate samples. Columns that are padding come back as 0."""
    batch, width = input_ids.shape
    real = attention_mask.bool()
    # (row, column) of every scored token: a real token at column >= start that has a real token before it
    index = (real.long().cumsum(-1) - 1)  # [B, T] position of each real token within its sample
    scored = real.clone()
    scored[:, :start] = False
    scored &= index >= 1
    rows, cols = scored.nonzero(as_tuple=True)
    if pack:
        lengths = real.sum(-1).tolist()
        layout = pack_rows(lengths, max(lengths))
        offset = [0] * batch  # where each sample starts in its packed row
        packed_row = [0] * batch
        packed_ids = torch.zeros((len(layout), max(lengths)), dtype=input_ids.dtype, device=input_ids.device)
        packed_pos = torch.zeros_like(packed_ids)
        for r, members in enumerate(layout):
            at = 0
            for i in members:
                n = lengths[i]
                packed_ids[r, at : at + n] = input_ids[i][real[i]]
                packed_pos[r, at : at + n] = torch.arange(n, device=input_ids.device)
                packed_row[i], offset[i] = r, at
                at += n
            if at < packed_ids.shape[1]:  # the row's tail: one more "sample" of padding, never scored
                packed_pos[r, at:] = torch.arange(packed_ids.shape[1] - at, device=input_ids.device)
        hidden = final_hidden_states(model, packed_ids, None, packed_pos)
        where_row = torch.tensor(packed_row, device=input_ids.device)[rows]
        where_col = torch.tensor(offset, device=input_ids.device)[rows] + index[rows, cols] - 1
        flat_h = hidden[where_row, where_col]  # [n, H]: the state before each scored token
    else:
        hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
        flat_h = hidden[rows, cols - 1]
    flat_y = input_ids[rows, cols]
    head = output_head(model)

    def scores(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [3, n]: log pi_T, entropy, log pi_1
        logits = head(h).float()
        z = logits / temperature if temperature != 1.0 else logits
        lse = z.logsumexp(-1)
        logp = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse
        entropy = lse - (z.softmax(-1) * z).sum(-1) if with_entropy else torch.zeros_like(lse)
        raw = logp if temperature == 1.0 or not with_raw else logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        return torch.stack([logp, entropy, raw])

    values = checkpointed_chunks(scores, flat_h, flat_y, chunk_tokens)
    out = values.new_zeros((3, batch, width - start))
    out[:, rows, cols - start] = values
    logp, entropy, raw = out
    return logp, entropy if with_entropy else None, raw if with_raw else None


@torch.no_grad()
def packing_agrees(model, device, tolerance: float = 1e-3) -> bool:
    """Whether this model reads packed rows (positions restarting at 0, no mask) as separate samples: the
    packed and the padded log-probs of three short random samples, two of them sharing a row, must agree.
    Models whose attention masks ignore position ids would let packed samples attend to each other."""
    vocab = _unwrap(model).get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # 5 tokens, left-padded
    mask[1, 6:] = 0  # 6 tokens, right-padded: packed into one row with the 5
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        padded = causal_lm_logprobs(model, ids, mask, 3, position_ids=position_ids)[0]
        packed = causal_lm_logprobs(model, ids, mask, 3, position_ids=position_ids, pack=True)[0]
    finally:
        model.train(was_training)
    worst = (padded - packed).abs().max().item()
    if worst > tolerance:
        print(f"note: packed and padded log-probs differ by {worst:.2g} on this model; train.padding_free is off")
    return worst <= tolerance


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def span_mask(spans: list[tuple[int, int]], width: int, device) -> torch.Tensor:
    """[B, width-1] mask over next-token positions: 1 where the predicted token lies in [start, end)."""
    mask = torch.zeros((len(spans), width - 1), device=device)
    for i, (start, end) in enumerate(spans):
        mask[i, max(start - 1, 0) : end - 1] = 1
    return mask
