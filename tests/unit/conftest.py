"""Shared fixtures for the unit tests: a tiny fast tokenizer that needs no download (also with a chat template),
a tiny model folder (also with the chat tokenizer)."""

import copy

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 257  # 256 byte tokens + <|endoftext|>; tiny models use a vocab of at least this


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per UTF-8 byte, any text, real offset mapping.

    Token id 256 (<|endoftext|>) is bos, eos and pad.
    """
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=special, eos_token=special, pad_token=special
    )


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny random-weight Llama saved with the tiny tokenizer: what `--model FOLDER` loads."""
    return saved_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


def saved_tiny_llama(folder, tokenizer) -> str:
    """Save a tiny random-weight Llama and `tokenizer` into `folder`; its path."""
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# A tiny chat template: one user turn, then the generation prompt.
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_tokenizer) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with `CHAT_TEMPLATE` (attribution builds ContextCite's chat prompt)."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def chat_model_folder(tmp_path_factory, chat_tokenizer) -> str:
    """A tiny random-weight Llama saved with the chat tokenizer."""
    return saved_tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), chat_tokenizer)
