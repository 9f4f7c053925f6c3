"""CLIP's byte-level BPE tokenizer, token-for-token equal to the original (openai/CLIP ``simple_tokenizer.py``).

``HfVlClipTokenizer`` is transformers' ``CLIPTokenizer`` (the ``tokenizers`` backend) plus what it lacks to match
openai/CLIP and open_clip (``open_clip/tokenizer.py``, ``SimpleTokenizer``, ``clean="lower"``):

* the original text cleaning: ``ftfy.fix_text`` (curly quotes, ligatures, mojibake, full-width forms), HTML
  unescaping (twice), whitespace collapsing, lower-casing. ``ftfy`` is optional here so the file ships in
  package-free Hub bundles; without it only HTML unescaping and whitespace cleaning run (a warning says so once);
* the 77-token context by default: texts are truncated like ``open_clip.tokenize`` (keep the start-of-text token
  and the first 75 text tokens, then end-of-text), and ``padding=True`` pads to 77 (the zero-shot pipeline passes
  only ``padding=True``). ``truncation=False`` is honoured but yields sequences the model cannot embed.

Padding uses ``<|endoftext|>`` (id 49407; open_clip pads with id 0). CLIP's causal text tower pools the first
end-of-text position, so the padding id never changes an embedding; ``attention_mask`` marks the real tokens.

The vocabulary is built from the original ``bpe_simple_vocab_16e6.txt.gz`` (shipped by openai/CLIP and
open_clip_torch) by ``build_clip_vocab``: 256 byte symbols, the same with ``</w>``, 48,894 merges, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) -- 49,408 entries, as in every CLIP checkpoint.
Only the standard library, ``tokenizers`` and transformers are imported, so the file ships in Hub bundles.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import warnings
from pathlib import Path

from transformers.models.clip.tokenization_clip import CLIPTokenizer

try:  # optional: open_clip's text cleaning; absent in a bare environment
    import ftfy
except ImportError:  # pragma: no cover - exercised only without ftfy installed
    ftfy = None

CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # the original reads lines[1 : 49152 - 256 - 2 + 1] of the merges file
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_warned_no_ftfy = False


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def clean_text(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy, double HTML unescape, whitespace collapse, lower case."""
    global _warned_no_ftfy
    if ftfy is not None:
        text = ftfy.fix_text(text)
    elif not _warned_no_ftfy:
        _warned_no_ftfy = True
        warnings.warn("ftfy is not installed: CLIP text cleaning skips ftfy.fix_text (install ftfy to match open_clip)")
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


def find_bpe_file() -> Path:
    """The ``bpe_simple_vocab_16e6.txt.gz`` of an installed open_clip_torch (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"open_clip_torch is not installed; pass vocab_gz_path= pointing to the original {BPE_FILE_NAME}"
        )
    path = Path(spec.origin).parent / BPE_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass vocab_gz_path= pointing to {BPE_FILE_NAME}")
    return path


def build_clip_vocab(vocab_gz_path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` from the original gzipped merges file, with the original's token ids."""
    path = Path(vocab_gz_path) if vocab_gz_path is not None else find_bpe_file()
    if not path.is_file():
        raise FileNotFoundError(f"vocab_gz_path={str(path)!r} does not exist")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{path} is not CLIP's {BPE_FILE_NAME}: expected {NUM_MERGES} merge pairs after the header")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer_files(save_directory: str | os.PathLike, vocab_gz_path=None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the Hub's CLIP layout) built from the original merges file."""
    vocab, merges = build_clip_vocab(vocab_gz_path)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


class HfVlClipTokenizer(CLIPTokenizer):
    r"""CLIP BPE tokenizer matching ``open_clip.tokenize`` token for token (see the module docstring).

    Args:
        vocab, merges: the BPE tables (``build_clip_vocab``); ``from_pretrained`` reads them from the saved files.
        model_max_length: the text context, 77 for every CLIP release.
        pad_to_context: make ``padding=True`` pad to ``model_max_length`` (what the original always does).
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab=None, merges=None, model_max_length: int = CONTEXT_LENGTH, pad_to_context: bool = True,
                 **kwargs):
        self.pad_to_context = pad_to_context
        super().__init__(vocab=vocab, merges=merges, model_max_length=model_max_length,
                         pad_to_context=pad_to_context, **kwargs)

    def _get_padding_truncation_strategies(self, padding=False, truncation=None, max_length=None, **kwargs):
        if truncation is None and max_length is None:
            truncation = True  # the original always cuts at the context; None would produce unembeddable rows
        if padding is True and self.pad_to_context:
            padding = "max_length"
        return super()._get_padding_truncation_strategies(
            padding=padding, truncation=truncation, max_length=max_length, **kwargs
        )

    def _encode_plus(self, text, text_pair=None, is_split_into_words: bool = False, **kwargs):
        if not is_split_into_words:
            text = _clean_batch(text, "text")
            text_pair = _clean_batch(text_pair, "text_pair")
        return super()._encode_plus(text, text_pair, is_split_into_words=is_split_into_words, **kwargs)


def _clean_batch(text, argument: str):
    if text is None:
        return None
    if isinstance(text, str):
        return clean_text(text)
    if isinstance(text, (list, tuple)):
        if len(text) == 0:
            # e.g. the zero-shot pipeline with candidate_labels=[]: fail here, not with an empty logits row
            raise ValueError(f"{argument} is an empty list; pass at least one string (e.g. one per candidate label)")
        if not all(isinstance(t, str) for t in text):
            bad = next(type(t).__name__ for t in text if not isinstance(t, str))
            raise TypeError(f"{argument} must be a string or a list of strings; found an element of type {bad}")
        return [clean_text(t) for t in text]
    raise TypeError(f"{argument} must be a string or a list of strings, got {type(text).__name__}")


def packaged_tokenizer_dir() -> Path:
    """``hf_vl/data/clip_tokenizer`` (vocab.json, merges.txt built by ``write_clip_tokenizer_files``). Located by
    path, not import, because this file also ships alone in Hub bundles (which carry their own tokenizer files)."""
    return Path(__file__).resolve().parent.parent / "data" / "clip_tokenizer"


def load_clip_tokenizer(**kwargs) -> HfVlClipTokenizer:
    """The CLIP tokenizer from the files packaged with hf_vl, else built from open_clip's merges file."""
    directory = packaged_tokenizer_dir()
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return HfVlClipTokenizer.from_pretrained(str(directory), **kwargs)
    return build_clip_tokenizer(**kwargs)


def build_clip_tokenizer(vocab_gz_path: str | os.PathLike | None = None, **kwargs) -> HfVlClipTokenizer:
    """A ``HfVlClipTokenizer`` built from the original merges file (open_clip's copy when no path is given)."""
    vocab, merges = build_clip_vocab(vocab_gz_path)
    return HfVlClipTokenizer(vocab=vocab, merges=merges, **kwargs)


__all__ = [
    "CONTEXT_LENGTH",
    "HfVlClipTokenizer",
    "build_clip_tokenizer",
    "build_clip_vocab",
    "clean_text",
    "load_clip_tokenizer",
    "write_clip_tokenizer_files",
]
