"""Prompt templates: filling in the subject's words, checking the result, and
the text a scoring model reads (the prompt without its unique token).

Templates name the subject with two fields, ``{token}`` (the rare word that
comes to mean the subject, ``config.data.unique_token``) and ``{class_name}``
(its class noun, ``config.data.class_name``):

  prompt = format_prompt("a photo of {token} {class_name}", token="sks",
                         class_name="dog")  # "a photo of sks dog"
"""

import re
import string
from typing import Callable, Sequence

from personalize_jax.errors import UserError
from personalize_jax.models import tokenizer as tokenizer_lib

FIELDS = ("token", "class_name")
_CONFIG_KEYS = {"token": "data.unique_token", "class_name": "data.class_name"}
_EXAMPLES = {"token": "'sks'", "class_name": "'dog' or 'backpack'"}


def _check_word(field: str, value: str) -> None:
  if not value.strip():
    raise UserError(
        f"config.{_CONFIG_KEYS[field]}={value!r} is empty; set "
        f"--config.{_CONFIG_KEYS[field]} to a word such as {_EXAMPLES[field]}")


def _fields(template: str) -> list[str]:
  """The replacement fields of a ``str.format`` template, in order."""
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise UserError(
        f"prompt template {template!r} is malformed ({e}); write literal "
        "braces as {{ and }}") from None
  return [name for _, name, _, _ in parsed if name is not None]


def format_prompt(template: str, *, token: str, class_name: str) -> str:
  """Fills ``{token}`` and ``{class_name}`` into a prompt template.

  Args:
    template: e.g. ``"a photo of {token} {class_name}"``; literal braces are
      written ``{{`` and ``}}``.
    token: the subject's unique token (``config.data.unique_token``).
    class_name: the subject's class noun (``config.data.class_name``).

  Returns:
    The prompt.

  Raises:
    UserError: the template is malformed or has a field other than
      ``{token}`` and ``{class_name}``, or uses one whose value is empty.
  """
  used = _fields(template)
  unknown = sorted({f"{{{name}}}" for name in used if name not in FIELDS})
  if unknown:
    raise UserError(
        f"prompt template {template!r} has unknown field(s) "
        f"{', '.join(unknown)}; use only {{token}} and {{class_name}} (write "
        "literal braces as {{ and }})")
  values = {"token": token, "class_name": class_name}
  for name in dict.fromkeys(used):
    _check_word(name, values[name])
  return template.format(**values)


def _token_pattern(token: str) -> re.Pattern:
  # CLIP lowercases its input, so "SKS" names the subject as well as "sks";
  # "sksy" does not (a different word for the tokenizer).
  return re.compile(rf"(?<!\w){re.escape(token.strip())}(?!\w)", re.IGNORECASE)


def _mentions(prompt: str, token: str) -> bool:
  return _token_pattern(token).search(prompt) is not None


def without_token(prompt: str, token: str) -> str:
  """The prompt with every mention of the unique token removed.

  This is the text a reward or evaluation model (CLIP) reads: it does not
  know the token, so the prompt is scored for what it says about the class.
  A mention is the token as a whole word in any case ("sks", "SKS", "sks,"),
  not a word that contains it ("sksy"); the remaining words are joined by
  single spaces.

  Args:
    prompt: a filled-in prompt, e.g. ``"a sks dog on the Moon"``.
    token: the subject's unique token (``config.data.unique_token``).

  Returns:
    The prompt without the token: ``"a dog on the Moon"``.
  """
  return " ".join(_token_pattern(token).sub(" ", prompt).split())


def check_prompts(prompts: Sequence[str], *, token: str,
                  tokenizer: tokenizer_lib.CLIPTokenizer,
                  warn: Callable[[str], None],
                  class_name: str | None = None) -> None:
  """Checks filled-in prompts before training; warns about likely mistakes.

  Args:
    prompts: prompts after ``format_prompt``.
    token: the subject's unique token (``config.data.unique_token``).
    tokenizer: the text encoder's tokenizer (``tokenizer.load_tokenizer``).
    warn: called with a one-line message per problem (each distinct prompt
      is reported once): a prompt without ``token`` (the subject is not
      named, so that prompt cannot show it), and a prompt over 77 tokens (the
      text encoder sees only its first 77).
    class_name: the subject's class noun (``config.data.class_name``), checked
      for emptiness when given.

  Raises:
    UserError: ``token`` or ``class_name`` is empty.
  """
  _check_word("token", token)
  if class_name is not None:
    _check_word("class_name", class_name)
  unique = list(dict.fromkeys(prompts))
  if not unique:
    return
  limit = tokenizer_lib.MAX_LENGTH
  counts = tokenizer_lib.count_tokens(tokenizer, unique)
  for prompt, count in zip(unique, counts):
    if not _mentions(prompt, token):
      warn(f"prompt {prompt!r} does not contain the unique token {token!r}, "
           "so it does not name the subject; add {token} to its template")
    if count > limit:
      warn(f"prompt {prompt!r} has {count} tokens, more than CLIP's {limit}; "
           f"it will be truncated to {limit} tokens (shorten it)")
