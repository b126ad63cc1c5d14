"""The code between the data and the losses, pinned by hand-computed expectations on stub models whose
logits are known: which column predicts which token, where a response starts and ends, which span is
reasoning and which is answer, which temperature a log-prob is taken at. Each of these would train
quietly and wrongly if it slipped by one."""

from types import SimpleNamespace

import pytest
import torch

from m1_align.preference.losses import preference_loss, token_terms
from m1_align.preference.trainer import next_token_labels
from m1_align.rl.elo import ReasoningPath, path_batch, path_logprobs, reasoning_tokens
from m1_align.rl.ppo import response_logprobs, response_values

V = 11
PAD = 0


class Lookup(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids):
        return (self.table[input_ids],)


class Bigram(torch.nn.Module):
    """logits at position t = table[x_t]: p(x_{t+1} | x_<=t) depends on x_t only, so every expected
    log-prob is one table lookup, whatever the padding around it. Shaped like a causal LM: a decoder
    (the lookup) whose hidden states an identity output head turns into logits."""

    def __init__(self, seed=0):
        super().__init__()
        self.decoder = Lookup(seed)
        self.head = torch.nn.Linear(V, V, bias=False)
        self.head.weight.data = torch.eye(V)
        self.head.requires_grad_(False)

    @property
    def table(self):
        return self.decoder.table

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        hidden = self.decoder(input_ids)[0]
        return SimpleNamespace(logits=self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden))

    def logp(self, prev: int, token: int, temperature: float = 1.0) -> float:
        return (self.table[prev] / temperature).log_softmax(-1)[token].item()


class TokenIdValues(torch.nn.Module):
    """A critic whose value at a position is the token id there."""

    def forward(self, input_ids, attention_mask, position_ids):
        return input_ids.float()


# two left-padded prompts and two right-padded responses of different lengths
PROMPTS = [[3, 4, 5], [6, 7]]
RESPONSES = [[8, 9], [1, 2, 10]]


def left_right_batch():
    width_p, width_r = 3, 3
    ids = torch.full((2, width_p + width_r), PAD)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p)
        ids[i, width_p : width_p + len(r)] = torch.tensor(r)
        mask[i, width_p - len(p) : width_p + len(r)] = 1
    return ids, mask, width_p


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_line_up_with_the_response_tokens(temperature):
    model = Bigram()
    ids, mask, start = left_right_batch()
    logp, entropy, raw = response_logprobs(model, ids, mask, start, temperature, with_entropy=True, with_raw=True)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        prev = [p[-1]] + r[:-1]
        assert logp[i, : len(r)].tolist() == pytest.approx([model.logp(a, b, temperature) for a, b in zip(prev, r, strict=True)], rel=1e-5)
        assert raw[i, : len(r)].tolist() == pytest.approx([model.logp(a, b) for a, b in zip(prev, r, strict=True)], rel=1e-5)
        dist = (model.table[prev[0]] / temperature).softmax(-1)
        assert entropy[i, 0].item() == pytest.approx(-(dist * dist.log()).sum().item(), rel=1e-4)


def test_values_are_read_at_the_state_before_each_response_token():
    ids, mask, start = left_right_batch()
    values = response_values(TokenIdValues(), ids, mask, start)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        assert values[i, : len(r)].tolist() == [float(t) for t in [p[-1]] + r[:-1]]


def test_elo_spans_and_temperatures():
    model = Bigram(1)
    paths = [ReasoningPath(0, [3, 4], [5, 6, 7], [8, 2]), ReasoningPath(0, [3], [9], [8, 10, 2])]
    batch = path_batch(paths, PAD, "cpu")
    reasoning, answer = path_logprobs(model, batch, temperature=0.5, length_normalize=False)
    for i, p in enumerate(paths):
        seq = p.prompt + p.reasoning + p.answer
        r0, a0 = len(p.prompt), len(p.prompt) + len(p.reasoning)
        want_r = sum(model.logp(seq[t - 1], seq[t], 0.5) for t in range(r0, a0))
        want_a = sum(model.logp(seq[t - 1], seq[t]) for t in range(a0, len(seq)))  # the model itself: T = 1
        assert reasoning[i].sum().item() == pytest.approx(want_r, rel=1e-5)
        assert answer[i].item() == pytest.approx(want_a, rel=1e-5)
        assert batch.reasoning_mask[i].sum() == len(p.reasoning) and batch.answer_mask[i].sum() == len(p.answer)
    _, normalised = path_logprobs(model, batch, 0.5, length_normalize=True)
    assert normalised.tolist() == pytest.approx([answer[0].item() / 2, answer[1].item() / 3], rel=1e-5)


class WordTokenizer:
    """Tokens are fixed strings; encode is greedy longest match. '.\\nAns' straddles the delimiter."""

    vocab = ["<pad>", "The", " code", " fits", ".", ".\nAns", "wer:", " A", "\nAnswer:", "</s>"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids)

    def encode(self, text, add_special_tokens=False):
        out = []
        while text:
            best = max((i for i, t in enumerate(self.vocab) if t and text.startswith(t)), key=lambda i: len(self.vocab[i]))
            out.append(best)
            text = text[len(self.vocab[best]) :]
        return out


def test_reasoning_cut_keeps_the_text_of_a_token_that_straddles_the_delimiter():
    tok = WordTokenizer()
    sampled = [1, 2, 3, 5, 6, 7]  # "The code fits" ".\nAns" "wer:" " A"
    kept = reasoning_tokens(sampled, tok, "\nAnswer:")
    assert tok.decode(kept) == "The code fits."
    assert kept == [1, 2, 3, 4]
    assert reasoning_tokens([1, 2, 8, 7], tok, "\nAnswer:") == [1, 2]  # a clean cut keeps the sampled tokens
    assert reasoning_tokens([1, 2, 3], tok, "\nAnswer:") is None


def test_tdpo_labels_are_the_next_tokens_of_the_completion_only():
    policy, reference = Bigram(2), Bigram(3)
    ids = torch.tensor([[3, 4, 5, 6, PAD], [3, 7, 8, PAD, PAD]])
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    labels = next_token_labels(ids, completion)
    terms = token_terms(policy(ids).logits[:, :-1], reference(ids).logits[:, :-1], labels)
    for i in range(2):
        ts = [t for t in range(5) if completion[i, t]]
        logp = sum(policy.logp(ids[i, t - 1].item(), ids[i, t].item()) for t in ts)
        ref = sum(reference.logp(ids[i, t - 1].item(), ids[i, t].item()) for t in ts)
        kl = sum(
            torch.nn.functional.kl_div(policy.table[ids[i, t - 1]].log_softmax(-1), reference.table[ids[i, t - 1]].log_softmax(-1),
                                       log_target=True, reduction="sum").item()
            for t in ts
        )
        assert terms.logp[i].item() == pytest.approx(logp, rel=1e-5)
        assert terms.logratio[i].item() == pytest.approx(logp - ref, rel=1e-5)
        assert terms.sequential_kl[i].item() == pytest.approx(kl, rel=1e-4)


def test_tdpo_logged_rewards_include_the_sequential_kl():
    policy, reference = Bigram(2), Bigram(3)
    ids = torch.tensor([[3, 4, 5, 6], [3, 4, 8, 9]])
    completion = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    terms = token_terms(policy(ids).logits[:, :-1], reference(ids).logits[:, :-1], next_token_labels(ids, completion))
    chosen, rejected = terms.halves()
    _, metrics = preference_loss(chosen, rejected, "tdpo2", beta=0.1)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1 * (chosen.logratio + chosen.sequential_kl).item(), rel=1e-5)
    _, dpo = preference_loss(chosen, rejected, "dpo", beta=0.1)
    assert dpo["rewards/chosen"].item() == pytest.approx(0.1 * chosen.logratio.item(), rel=1e-5)


def test_reward_model_sees_the_end_of_a_long_response(tokenizer_dir):
    from transformers import AutoTokenizer

    from m1_align.rewards.reward_model import score_conversations

    class LastToken(torch.nn.Module):
        """Scores a conversation by the id of its last real token."""

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            last = attention_mask.sum(1) - 1
            return SimpleNamespace(logits=input_ids[torch.arange(len(input_ids)), last][:, None].float())

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    long_prompt = [{"role": "user", "content": "history " * 200}]
    conversation = long_prompt + [{"role": "assistant", "content": "reasoning\nAnswer: E11.9"}]
    full = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(full) > 64
    (score,) = score_conversations(LastToken(), tok, [conversation], max_length=64)
    assert score == full[-1]
    assert tok.truncation_side == "right"  # restored


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("model_kind", ["hybrid", "llama_lora"])
def test_chunked_head_equals_the_full_logits(model_kind, pack, tiny_model_dir, tiny_llama_dir):
    """causal_lm_logprobs (head on the scored positions only, in checkpointed chunks; optionally with the
    samples packed into rows without padding) gives the log-probs, entropies and gradients of the plain
    full-logits computation over a left- and right-padded batch, on the hybrid model and a LoRA Llama."""
    from transformers import AutoModelForCausalLM

    import m1_align.model  # noqa: F401
    from m1_align.logprobs import causal_lm_logprobs, pack_rows
    from m1_align.rl.ppo import positions

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir if model_kind == "hybrid" else tiny_llama_dir))
    if model_kind == "llama_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(5, 200, (4, 17))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded prompt (13 tokens)
    mask[1, 10:] = 0  # a short response (10 tokens)
    mask[2, :2] = 0
    mask[2, 9:] = 0  # both (7 tokens): packed into one row with the 10 (rows hold at most 17)
    start, temperature = 6, 0.7
    scored = mask[:, start:].float()
    weights = torch.randn(4, 17 - start) * scored

    def reference():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
        logits = logits[:, start - 1 : -1].float()
        z = logits / temperature
        logp = z.log_softmax(-1).gather(-1, ids[:, start:, None]).squeeze(-1)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        raw = logits.log_softmax(-1).gather(-1, ids[:, start:, None]).squeeze(-1)
        return logp, entropy, raw

    if pack:
        assert pack_rows(mask.sum(-1).tolist(), 17) == [[3], [0], [1, 2]]

    def chunked():
        return causal_lm_logprobs(model, ids, mask, start, temperature, position_ids=positions(mask), with_raw=True,
                                  with_entropy=True, chunk_tokens=5, pack=pack)

    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for compute in (reference, chunked):
        model.zero_grad()
        logp, entropy, raw = compute()
        ((logp + 0.1 * entropy + raw) * weights).sum().backward()
        results.append(([x.detach() * scored for x in (logp, entropy, raw)], [p.grad.clone() for p in params]))
    (values, grads), (got_values, got_grads) = results
    for expected, got in zip(values, got_values, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    for expected, got in zip(grads, got_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # packed attention sums in another order
