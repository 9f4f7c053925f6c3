"""CLIP tokenizer vs open_clip token for token, image processor vs open_clip's preprocessing, the processor."""

from __future__ import annotations

import string

import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hf_vl.processing.image_processing_hf_vl_clip import HfVlClipImageProcessor
from hf_vl.processing.processing_hf_vl_clip import HfVlClipProcessor
from hf_vl.processing.tokenization_hf_vl_clip import (
    HfVlClipTokenizer,
    build_clip_tokenizer,
    build_clip_vocab,
    clean_text,
    load_clip_tokenizer,
    packaged_tokenizer_dir,
    write_clip_tokenizer_files,
)

open_clip = pytest.importorskip("open_clip")

SENTENCES = [
    "a photo of a cat.",
    "A PHOTO OF A DOG",
    "This is a photo of a red circle.",
    "",
    "   ",
    "Hello, World!!",
    "wow!!! ... ?! (really) [yes] {no} <maybe>",
    "don't you're we've I'm they'll he'd it's",
    "The quick brown fox jumps over the lazy dog; 1234567890 times.",
    "Ünïcödé façade naïve café résumé Zürich",
    "東京タワーの写真",
    "Москва — столица России",
    "emoji 😀🐱‍👤 👍🏽 and ❤️",
    "“curly quotes” and ‘single’ ones",
    "ﬁne ﬂowers, Ｆｕｌｌ ＷＩＤＴＨ text",
    "Tom &amp; Jerry &lt;3 &quot;cartoon&quot; &#39;s",
    "tabs\tand\nnew\r\nlines   and    spaces",
    "mojibake: CafÃ© dÃ©jÃ  vu",
    "hyphen-ated_words and snake_case and camelCaseWords",
    "$100.99 @user #hashtag https://example.com/path?x=1&y=2",
    "a" * 300,
    "Mixed CASE Sentence With Proper Nouns Like New York City",
    "x²+y²=z² ½ ¼ ℃ № ™ ©",
]
LONG_TEXTS = [
    " ".join(["word"] * 120),
    "A very long caption that goes on and on about a photograph of a busy street market in the old town, " * 4,
    "punctuation!!! " * 60,
    "supercalifragilisticexpialidocious " * 30,
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")  # open_clip's SimpleTokenizer on the same merges file


def _assert_equal_to_open_clip(encoding, reference_ids):
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    assert ids.shape == reference_ids.shape == (reference_ids.shape[0], 77)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        assert ids[row, :n].tolist() == reference_ids[row, :n].tolist(), f"row {row}"
        assert reference_ids[row, n:].eq(0).all(), f"row {row}: open_clip has more tokens"
        assert ids[row, n:].eq(49407).all() and mask[row, :n].eq(1).all()


def test_sentences_equal_open_clip_token_for_token(tokenizer, reference):
    encoding = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    _assert_equal_to_open_clip(encoding, reference(SENTENCES))


def test_long_texts_truncate_like_open_clip(tokenizer, reference):
    encoding = tokenizer(LONG_TEXTS, padding=True, return_tensors="pt")
    _assert_equal_to_open_clip(encoding, reference(LONG_TEXTS))
    assert encoding["attention_mask"].all()  # all 77 positions are real tokens ...
    assert encoding["input_ids"][:, 0].eq(49406).all() and encoding["input_ids"][:, -1].eq(49407).all()  # SOT..EOT


def test_truncation_is_the_default_even_without_padding(tokenizer, reference):
    ids = tokenizer(LONG_TEXTS[0])["input_ids"]
    assert len(ids) == 77 and ids[-1] == 49407
    assert ids == reference([LONG_TEXTS[0]])[0].tolist()


# printable ASCII plus accents, CJK, emoji (with ZWJ), curly quotes, ligatures, full-width letters, odd whitespace
# (no-break, em, zero-width, line separator, C1/C0 separators), dotted/dotless i and HTML entity characters
_ALPHABET = string.printable + "éèàüößçñ東京タワー😀🐱‍👤“”‘’ﬁﬂＦｕｌ\u00a0\u2003\u200b\u2028\x1c\x1d\x85İı&;#<>|"


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(alphabet=_ALPHABET, max_size=60), min_size=1, max_size=4))
def test_random_text_equals_open_clip(tokenizer, reference, texts):
    _assert_equal_to_open_clip(tokenizer(texts, padding=True, return_tensors="pt"), reference(texts))


def test_single_string_equals_batch_row(tokenizer):
    single = tokenizer(SENTENCES[2], padding=True, return_tensors="pt")
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    torch.testing.assert_close(single["input_ids"][0], batch["input_ids"][2])


def test_padding_modes(tokenizer):
    assert tokenizer(["a cat", "a big red dog"], padding=True)["input_ids"][0].__len__() == 77
    unpadded = tokenizer(["a cat", "a big red dog"])["input_ids"]
    assert [len(x) for x in unpadded] == [4, 6]
    assert len(tokenizer(["a cat", "a big red dog"], padding="longest")["input_ids"][0]) == 6
    no_context = HfVlClipTokenizer.from_pretrained(str(packaged_tokenizer_dir()), pad_to_context=False)
    assert len(no_context(["a cat", "a big red dog"], padding=True)["input_ids"][0]) == 6
    # explicit truncation=False is honoured (the model then rejects the too-long row)
    assert len(tokenizer(LONG_TEXTS[0], truncation=False)["input_ids"]) == 122


def test_special_token_text_follows_openai(tokenizer, reference):
    """OpenAI's tokenizer reads a literal '<|endoftext|>' as the special token (as transformers does); open_clip
    renamed its specials, so there it is plain text. split_special_tokens=True gives open_clip's reading."""
    text = "an image of a <|endoftext|> token"
    default = tokenizer(text)["input_ids"]
    assert default.count(49407) == 2
    split = tokenizer(text, split_special_tokens=True)["input_ids"]
    ref = reference([text])[0]
    assert split == ref[: len(split)].tolist()


def test_vocab_built_from_the_original_merges_file():
    vocab, merges = build_clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    simple = open_clip.tokenizer.SimpleTokenizer()
    assert {token: i for token, i in vocab.items() if i < 49406} == {
        token: i for token, i in simple.encoder.items() if i < 49406
    }


def test_packaged_files_equal_freshly_built(tmp_path):
    vocab_file, merges_file = write_clip_tokenizer_files(tmp_path)
    assert vocab_file.read_bytes() == (packaged_tokenizer_dir() / "vocab.json").read_bytes()
    assert merges_file.read_bytes() == (packaged_tokenizer_dir() / "merges.txt").read_bytes()


def test_build_from_explicit_path_equals_packaged(tokenizer):
    path = open_clip.tokenizer.default_bpe()
    built = build_clip_tokenizer(path)
    assert built(SENTENCES)["input_ids"] == tokenizer(SENTENCES)["input_ids"]


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = HfVlClipTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 77 and loaded.pad_to_context
    assert loaded(SENTENCES, padding=True)["input_ids"] == tokenizer(SENTENCES, padding=True)["input_ids"]


def test_decode_round_trip(tokenizer):
    ids = tokenizer("A Photo of a Red Circle!")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a red circle !"


def test_clean_text_matches_open_clip():
    from open_clip.tokenizer import _clean_lower

    for text in SENTENCES + LONG_TEXTS:
        assert clean_text(text) == _clean_lower(text)


@pytest.mark.parametrize("bad", [None, 3, [["nested"]], ["ok", 5]])
def test_bad_text_raises(tokenizer, bad):
    with pytest.raises((TypeError, ValueError)):
        tokenizer(bad)


def test_missing_merges_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_gz_path"):
        build_clip_vocab(tmp_path / "nope.txt.gz")


# ---------------------------------------------------------------------------------------------- image processor

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]


@pytest.fixture(scope="module")
def open_clip_preprocess():
    return open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None)[2]


@pytest.mark.parametrize("name", PHOTOS)
def test_matches_open_clip_preprocessing(name, open_clip_preprocess):
    """Same geometry as torchvision Resize(bicubic, antialias)+CenterCrop on PIL; values within 1 uint8 level."""
    image = Image.fromarray(getattr(skimage.data, name)())
    ours = HfVlClipImageProcessor()(image, return_tensors="pt")["pixel_values"][0]
    ref = open_clip_preprocess(image)
    assert ours.shape == ref.shape == (3, 224, 224)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    levels = (ours - ref).abs() * std * 255  # difference in uint8 levels of the resized image
    assert levels.max() <= 1.0 + 1e-3, f"max {levels.max():.3f} levels"
    assert levels.mean() < 0.01, f"mean {levels.mean():.4f} levels"


def test_336px_variant(open_clip_preprocess):
    image = Image.fromarray(skimage.data.coffee())
    processor = HfVlClipImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 336, 336)


def _modes():
    coffee = Image.fromarray(skimage.data.coffee())
    chelsea = Image.fromarray(skimage.data.chelsea())
    sixteen = Image.fromarray(np.asarray(chelsea.convert("L")).astype(np.uint16) * 257)
    return [
        coffee, chelsea.convert("L"), chelsea.convert("LA"), coffee.convert("RGBA"), coffee.convert("P"),
        coffee.convert("CMYK"), chelsea.convert("1"), sixteen, coffee.resize((37, 23)), coffee.resize((5, 300)),
        coffee.resize((1, 1)), coffee.resize((3, 40)), coffee.resize((40, 3)), coffee.resize((3, 3)),
        skimage.data.coffee(), skimage.data.camera(),
        torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1), np.zeros((40, 50, 4), dtype=np.uint8),
    ]


def test_4d_batch_equals_list():
    photos = np.stack([skimage.data.astronaut()[:300, :400], skimage.data.coffee()[:300, :400]])  # (2, H, W, 3)
    processor = HfVlClipImageProcessor()
    batch = processor(photos, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch, processor(list(photos), return_tensors="pt")["pixel_values"])
    assert batch.shape == (2, 3, 224, 224)


def test_any_mode_and_size_batches():
    images = _modes()
    pixel_values = HfVlClipImageProcessor()(images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (len(images), 3, 224, 224)
    assert torch.isfinite(pixel_values).all()


def test_batch_equals_single():
    images = _modes()[:5]
    processor = HfVlClipImageProcessor()
    batch = processor(images, return_tensors="pt")["pixel_values"]
    for i, image in enumerate(images):
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"][0], batch[i])


def test_grayscale_equals_its_rgb_conversion():
    gray = Image.fromarray(skimage.data.camera())
    processor = HfVlClipImageProcessor()
    torch.testing.assert_close(
        processor(gray, return_tensors="pt")["pixel_values"],
        processor(gray.convert("RGB"), return_tensors="pt")["pixel_values"],
    )


@pytest.mark.parametrize(
    "bad, error",
    [
        (12, TypeError),
        ([], ValueError),
        (np.zeros((2, 7, 4, 5)), ValueError),
        (np.zeros((2, 3, 4, 5, 6)), ValueError),
        (np.zeros((0, 10, 3)), ValueError),
        ({"image": 1}, TypeError),
    ],
)
def test_bad_images_raise(bad, error):
    with pytest.raises(error, match="images"):
        HfVlClipImageProcessor()(bad)


# ---------------------------------------------------------------------------------------------- processor


@pytest.fixture(scope="module")
def processor(tokenizer):
    return HfVlClipProcessor(HfVlClipImageProcessor(), tokenizer)


def test_processor_outputs(processor, reference):
    images = [Image.fromarray(skimage.data.astronaut()), skimage.data.coffee()]
    texts = ["a photo of an astronaut", "a cup of coffee"]
    out = processor(images=images, text=texts, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 224, 224)
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 77)
    _assert_equal_to_open_clip(out, reference(texts))
    expected = HfVlClipImageProcessor()(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], expected)


def test_processor_text_only_pads_to_context(processor):
    out = processor(text="a cat", return_tensors="pt")
    assert out["input_ids"].shape == (1, 77) and "pixel_values" not in out


def test_processor_save_load_parts(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    image_processor = HfVlClipImageProcessor.from_pretrained(tmp_path)
    tokenizer = HfVlClipTokenizer.from_pretrained(tmp_path)
    reloaded = HfVlClipProcessor(image_processor, tokenizer)
    image = Image.fromarray(skimage.data.chelsea())
    a = processor(images=image, text=SENTENCES[:3], return_tensors="pt")
    b = reloaded(images=image, text=SENTENCES[:3], return_tensors="pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"text": []}, ValueError, "empty"),
        ({"text": 3}, TypeError, "text"),
        ({"text": ["ok", None]}, TypeError, "text"),
        ({"images": 3.5}, TypeError, "images"),
        ({}, ValueError, "input"),
    ],
)
def test_processor_bad_input(processor, kwargs, error, match):
    with pytest.raises(error, match=match):
        processor(**kwargs)


def test_processor_requires_parts(tokenizer):
    with pytest.raises(ValueError, match="image_processor"):
        HfVlClipProcessor(None, tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        HfVlClipProcessor(HfVlClipImageProcessor(), None)
