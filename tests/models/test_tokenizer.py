"""The shipped CLIP vocabulary and tokenize() against two references.

References: transformers' ``CLIPTokenizer`` built from files re-derived from
``../shared/clip_bpe`` in the test, and an independent re-statement of OpenAI's
``SimpleTokenizer`` BPE (below) reading the ``.txt.gz`` directly.
"""

import functools
import gzip
import json
import unicodedata

import numpy as np
import pytest
import regex

from personalize_jax.errors import CheckpointError
from personalize_jax.models import tokenizer as tok_lib

BOS, EOS = 49406, 49407
EDGE_CASES = [
    "",
    "   ",
    "a photo of sks dog",
    "A  Photo\tOF   a CAT, in Zürich; café crème & naïve façade!",
    "日本の犬の写真 🐶🐕 — ünïcödé «quotes» it's we'll 1234",
    " ".join(["a very long prompt about a sks dog"] * 12),
    "x" * 300,
]


def _bpe_gz(shared_dir):
  return shared_dir / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


class _SimpleTokenizer:
  """OpenAI CLIP's BPE, restated from its description (NFC instead of ftfy)."""

  _PAT = regex.compile(
      r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
      r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)

  def __init__(self, bpe_gz):
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    # GPT-2's byte table: printable bytes as themselves, then the rest
    # shifted to 256 + n.
    printable = [b for b in range(256) if 33 <= b <= 126
                 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    self.byte_char = {b: chr(b) for b in printable}
    self.byte_char.update({b: chr(256 + n) for n, b in enumerate(others)})
    chars = list(self.byte_char.values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    self.encoder = {t: i for i, t in enumerate(vocab)}
    self.ranks = {m: i for i, m in enumerate(merges)}

  @functools.lru_cache(maxsize=None)
  def _bpe(self, token):
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:])}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    return word

  def encode(self, text):
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()
    ids = []
    for piece in self._PAT.findall(text.lower()):
      chars = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
      ids += [self.encoder[t] for t in self._bpe(chars)]
    return ids

  def tokenize(self, text, max_length=77):
    ids = [BOS] + self.encode(text)[:max_length - 2] + [EOS]
    return ids + [EOS] * (max_length - len(ids))


@pytest.fixture(scope="module")
def shipped():
  return tok_lib.load_tokenizer("tiny")


@pytest.fixture(scope="module")
def dreambench_prompts(shared_dir):
  prompts = json.loads((shared_dir / "dreambench" / "prompts.json").read_text())
  subjects = json.loads(
      (shared_dir / "dreambench" / "subjects.json").read_text())["subjects"]
  return sorted({t.format("sks", s["class"]) for s in subjects
                 for t in prompts[s["prompt_list"]]})


def test_known_ids_with_shipped_vocab(shipped):
  ids = tok_lib.tokenize(shipped, ["a photo of sks dog", "a photo of a cat"])
  assert ids.dtype == np.int32 and ids.shape == (2, 77)
  np.testing.assert_array_equal(
      ids[0, :7], [49406, 320, 1125, 539, 48136, 1929, 49407])
  np.testing.assert_array_equal(ids[1, :7], [49406, 320, 1125, 539, 320, 2368,
                                             49407])
  assert (ids[:, 7:] == EOS).all()  # SD 1.x pads with <|endoftext|>
  assert len(shipped) == 49408


def test_shipped_files_equal_fresh_derivation(shared_dir, tmp_path):
  out = tok_lib.write_clip_vocab(_bpe_gz(shared_dir), tmp_path)
  for name in ("vocab.json", "merges.txt"):
    shipped_bytes = (tok_lib.ASSETS / name).read_bytes()
    assert (out / name).read_bytes() == shipped_bytes, name
  assert ((tok_lib.ASSETS / "LICENSE").read_bytes()
          == (shared_dir / "clip_bpe" / "LICENSE").read_bytes())
  assert (out / "merges.txt").read_text().splitlines()[0] == "#version: 0.2"
  assert len(json.loads((out / "vocab.json").read_text())) == 49408


def test_ids_match_references(shared_dir, shipped, dreambench_prompts,
                               tmp_path):
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  reference = CLIPTokenizer.from_pretrained(
      str(tok_lib.write_clip_vocab(_bpe_gz(shared_dir), tmp_path)))
  simple = _SimpleTokenizer(_bpe_gz(shared_dir))
  prompts = dreambench_prompts + EDGE_CASES
  assert len(dreambench_prompts) > 50  # 25 prompts x every subject class
  ours = tok_lib.tokenize(shipped, prompts)
  hf = reference(prompts, padding="max_length", max_length=77,
                 truncation=True)["input_ids"]
  np.testing.assert_array_equal(ours, np.asarray(hf))
  np.testing.assert_array_equal(ours, [simple.tokenize(p) for p in prompts])


def test_truncation_keeps_eos_and_is_reported(shipped):
  prompts = ["a photo of sks dog", EDGE_CASES[-2], ""]
  ids = tok_lib.tokenize(shipped, prompts)
  counts = tok_lib.count_tokens(shipped, prompts)
  assert counts.tolist()[0] == 7 and counts[1] > 77 and counts[2] == 2
  assert ids[1, 0] == BOS and ids[1, -1] == EOS and (ids[1, 1:-1] != EOS).all()
  np.testing.assert_array_equal(ids[2, :3], [BOS, EOS, EOS])
  short = tok_lib.tokenize(shipped, "a photo of sks dog", max_length=5)
  np.testing.assert_array_equal(short, [[BOS, 320, 1125, 539, EOS]])


def test_pipeline_folder_uses_its_own_padding(shipped, tmp_path):
  # SD 2.x tokenizers pad with "!" (id 0): the folder's settings must win.
  shipped.save_pretrained(str(tmp_path / "sd1" / "tokenizer"))
  sd2 = tok_lib.CLIPTokenizer.from_pretrained(str(tok_lib.ASSETS),
                                              pad_token="!")
  sd2.save_pretrained(str(tmp_path / "sd2" / "tokenizer"))
  ids1 = tok_lib.tokenize(tok_lib.load_tokenizer(tmp_path / "sd1"), "a dog")
  ids2 = tok_lib.tokenize(tok_lib.load_tokenizer(tmp_path / "sd2"), "a dog")
  np.testing.assert_array_equal(ids1[0, :5], [BOS, 320, 1929, EOS, EOS])
  np.testing.assert_array_equal(ids2[0, :5], [BOS, 320, 1929, EOS, 0])


def test_missing_tokenizer_is_one_line_error(tmp_path):
  (tmp_path / "tokenizer").mkdir()
  for path in (tmp_path / "nope", tmp_path):
    with pytest.raises(CheckpointError) as info:
      tok_lib.load_tokenizer(path)
    assert "\n" not in str(info.value)
