"""A small byte-level BPE tokenizer trained in-repo on the medical corpus.

Byte-level, so any text round-trips losslessly; digits are split one per token as in Baichuan-M1
(numbers and ICD codes then tokenize uniformly); the chat special tokens are atomic.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from m1_align.data.chat import ASSISTANT_TOKEN, BAICHUAN_CHAT_TEMPLATE, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train on texts, save to out_dir in Hugging Face format and return the
    PreTrainedTokenizerFast (reload it with AutoTokenizer.from_pretrained(out_dir))."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (special tokens + 256 bytes), got {vocab_size}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        chat_template=BAICHUAN_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
