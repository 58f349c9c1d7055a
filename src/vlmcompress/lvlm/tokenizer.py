"""A word-level tokenizer for the embedded LVLM, built with the `tokenizers` library.

Scene language is a closed vocabulary (colours, shapes, question words, numbers, box
coordinates), so one id per word keeps sequences short and the LM small. Two fast tokenizers
share the vocabulary: the LM's (``<s> text``, like Llama's) and CLIP's text tower's
(``<s> text </s>``: CLIP pools the hidden state at the first ``</s>``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIALS = [PAD, UNK, BOS, EOS, IMAGE]
# Split on whitespace and keep punctuation as its own word, but keep decimals ("0.25") whole.
_SPLIT = r"\d+\.\d+|[\w']+|[^\w\s]"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    from tokenizers import Regex
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")])


def words(text: str) -> list[str]:
    """The words the tokenizer will see in ``text`` (lower-cased)."""
    import re
    return re.findall(_SPLIT, text.lower())


def build_vocab(corpus: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Special tokens, then every word of ``corpus`` and ``extra`` in sorted order (deterministic)."""
    vocab = set(extra)
    for text in corpus:
        vocab.update(words(text))
    vocab -= set(SPECIALS)
    return SPECIALS + sorted(vocab)


def build_tokenizers(vocab: list[str]) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """(LM tokenizer, CLIP tokenizer) over ``vocab``; unknown words map to ``<unk>``."""
    ids = {w: i for i, w in enumerate(vocab)}

    def make(template: str) -> PreTrainedTokenizerFast:
        tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = _pre_tokenizer()
        specials = [(BOS, ids[BOS]), (EOS, ids[EOS])]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
        from tokenizers import decoders
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                       pad_token=PAD, additional_special_tokens=[IMAGE],
                                       model_max_length=512, padding_side="right")

    return make(f"{BOS} $A"), make(f"{BOS} $A {EOS}")


def number_tokens(vocab: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The box-coordinate tokens ``0.00`` ... ``1.00`` of ``vocab``: their ids and values ``[K]``,
    ascending by value."""
    pairs = sorted((float(w), i) for w, i in vocab.items() if re.fullmatch(r"[01]\.\d\d", w) and float(w) <= 1)
    return torch.tensor([i for _, i in pairs], dtype=torch.long), torch.tensor([v for v, _ in pairs])
