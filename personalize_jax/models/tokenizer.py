"""The CLIP tokenizer: transformers' ``CLIPTokenizer`` on a checkpoint's files.

Tokenizing is not ported: the real ``transformers.CLIPTokenizer`` reads a
checkpoint's ``tokenizer/`` folder, so ids always match what the text encoder
was trained with (SD 2.x pads with ``!``, SD 1.x with ``<|endoftext|>``).

The ``tiny`` preset uses the CLIP BPE vocabulary shipped with this package
(``assets/clip_tokenizer``, MIT licence), derived once from OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` by ``write_clip_vocab`` so the product works
offline.
"""

import gzip
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from transformers import CLIPTokenizer

from personalize_jax.errors import CheckpointError
from personalize_jax.models import checkpoint, presets

ASSETS = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
MAX_LENGTH = 77

# OpenAI's tokenizer keeps merges 1..48,894 of the file (line 0 is a header):
# 512 byte tokens + 48,894 merges + 2 special tokens = 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

__all__ = ["CLIPTokenizer", "load_tokenizer", "load_from_folder", "tokenize",
           "count_tokens", "write_clip_vocab"]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table, in vocabulary order.

  Printable Latin-1 bytes map to themselves and come first; the other 68 bytes
  (controls, space, ...) follow in byte order, mapped to code points from 256
  on, so the BPE never sees whitespace or control characters.
  """
  printable = (list(range(ord("!"), ord("~") + 1))
               + list(range(ord("\u00a1"), ord("\u00ac") + 1))
               + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  rest = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable},
          **{b: chr(256 + n) for n, b in enumerate(rest)}}


def write_clip_vocab(bpe_gz_path: str | os.PathLike,
                     out_dir: str | os.PathLike) -> Path:
  """Derives ``vocab.json`` + ``merges.txt`` from OpenAI's CLIP BPE file.

  The vocabulary is built as OpenAI's ``SimpleTokenizer`` builds it: the 256
  byte characters, the same with ``</w>``, one token per merge, then
  ``<|startoftext|>`` and ``<|endoftext|>``.

  Args:
    bpe_gz_path: ``bpe_simple_vocab_16e6.txt.gz``.
    out_dir: the folder to write into (created if needed).

  Returns:
    ``out_dir`` as a ``Path``.
  """
  lines = gzip.open(bpe_gz_path).read().decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
  if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
    raise CheckpointError(
        f"{bpe_gz_path} is not OpenAI's CLIP BPE merges file (expected "
        f"{_NUM_MERGES} merge pairs after a header)")
  byte_chars = list(_bytes_to_unicode().values())
  tokens = (byte_chars + [c + "</w>" for c in byte_chars]
            + ["".join(m) for m in merges] + list(_SPECIAL_TOKENS))
  vocab = {token: i for i, token in enumerate(tokens)}
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n",
                                  encoding="utf-8")
  (out / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
      encoding="utf-8")
  return out


def load_tokenizer(path_or_hub_id: str | os.PathLike,
                   subfolder: str | None = "tokenizer") -> CLIPTokenizer:
  """Loads the ``CLIPTokenizer`` of a checkpoint.

  Args:
    path_or_hub_id: a diffusers pipeline folder or Hub id, a folder holding
      ``vocab.json`` + ``merges.txt``, or ``"tiny"`` for the shipped CLIP
      vocabulary.
    subfolder: where the tokenizer files live inside it (``None`` for a
      transformers CLIP checkpoint, which keeps them at its root). Ignored for
      ``"tiny"``.

  Raises:
    CheckpointError: the folder has no tokenizer files or they do not load.
  """
  if str(path_or_hub_id) == presets.TINY:
    return CLIPTokenizer.from_pretrained(str(ASSETS),
                                         model_max_length=MAX_LENGTH)
  return load_from_folder(
      CLIPTokenizer, checkpoint.resolve_pretrained(path_or_hub_id, subfolder),
      (("vocab.json", "merges.txt"), ("tokenizer.json",)), kind="CLIP",
      hint="pass the pipeline folder whose tokenizer/ holds them")


def load_from_folder(tokenizer_cls: type, folder: Path,
                     file_sets: Sequence[Sequence[str]], *, kind: str,
                     hint: str):
  """A Hugging Face tokenizer from a local folder, with one-line errors.

  Args:
    tokenizer_cls: the ``transformers`` tokenizer class to load.
    folder: the folder holding its files.
    file_sets: the alternatives, each the files that together make the
      tokenizer (``(("vocab.json", "merges.txt"), ("tokenizer.json",))``).
    kind: the tokenizer's family, for the message (``"CLIP"``).
    hint: what to pass instead when the files are missing.

  Raises:
    CheckpointError: no alternative is complete, or the files do not load
      (corrupt or truncated).
  """
  if not any(all((folder / n).is_file() for n in names) for names in file_sets):
    listed = " or ".join(" + ".join(names) for names in file_sets)
    raise CheckpointError(
        f"{folder} has no {kind} tokenizer files ({listed}); {hint}")
  try:
    return tokenizer_cls.from_pretrained(str(folder))
  # The Rust tokenizers backend raises plain Exceptions on corrupt files.
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"could not load the tokenizer in {folder} "
                          f"({reason}); re-download or re-save it") from None


def _as_list(prompts: str | Sequence[str]) -> list[str]:
  return [prompts] if isinstance(prompts, str) else list(prompts)


def tokenize(tokenizer: CLIPTokenizer, prompts: str | Sequence[str],
             max_length: int = MAX_LENGTH) -> np.ndarray:
  """Token ids as diffusers' pipelines make them: padded and truncated.

  Truncation keeps ``<|startoftext|>`` first and the end token last. Use
  ``count_tokens`` to find (and warn about) prompts that were cut.

  Args:
    tokenizer: from ``load_tokenizer``.
    prompts: one prompt or a list.
    max_length: the text encoder's context (77 for every CLIP).

  Returns:
    ``(batch, max_length)`` int32 ids.
  """
  ids = tokenizer(_as_list(prompts), padding="max_length",
                  max_length=max_length, truncation=True)["input_ids"]
  return np.asarray(ids, dtype=np.int32).reshape(-1, max_length)


def count_tokens(tokenizer: CLIPTokenizer,
                 prompts: str | Sequence[str]) -> np.ndarray:
  """The untruncated length of each prompt, start and end tokens included.

  A prompt was truncated by ``tokenize`` when its count exceeds
  ``max_length``.

  Returns:
    ``(batch,)`` int32 counts.
  """
  # verbose=False: the caller decides how to warn about long prompts.
  ids = tokenizer(_as_list(prompts), truncation=False,
                  verbose=False)["input_ids"]
  return np.asarray([len(x) for x in ids], dtype=np.int32)
