"""Tests for personalize_jax.data.prompts (the shipped CLIP vocabulary, offline)."""

import pytest

from personalize_jax.data import prompts
from personalize_jax.errors import UserError
from personalize_jax.models import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load_tokenizer("tiny")


def _check(tokenizer, prompt_list, token="sks", **kwargs):
  warnings = []
  prompts.check_prompts(prompt_list, token=token, tokenizer=tokenizer,
                        warn=warnings.append, **kwargs)
  assert all("\n" not in w for w in warnings)
  return warnings


def test_format_prompt_fills_both_fields():
  assert prompts.format_prompt("a photo of {token} {class_name}", token="sks",
                               class_name="dog") == "a photo of sks dog"
  assert prompts.format_prompt("{class_name}, {{literal}}", token="sks",
                               class_name="cat") == "cat, {literal}"
  assert prompts.format_prompt("no fields", token="", class_name="") == (
      "no fields")


@pytest.mark.parametrize("template, bad", [
    ("a photo of {tok} {class_name}", "{tok}"),
    ("a {} dog", "{}"),
    ("a {token.upper} dog", "{token.upper}"),
])
def test_format_prompt_unknown_field(template, bad):
  with pytest.raises(UserError) as info:
    prompts.format_prompt(template, token="sks", class_name="dog")
  message = str(info.value)
  assert "\n" not in message
  assert bad in message and repr(template) in message
  assert "{token} and {class_name}" in message


def test_format_prompt_malformed_braces():
  with pytest.raises(UserError, match=r"malformed .*\{\{ and \}\}"):
    prompts.format_prompt("a {token dog", token="sks", class_name="dog")


@pytest.mark.parametrize("kwargs, key", [
    ({"token": " ", "class_name": "dog"}, "data.unique_token"),
    ({"token": "sks", "class_name": ""}, "data.class_name"),
])
def test_format_prompt_empty_word(kwargs, key):
  with pytest.raises(UserError, match=f"config.{key}=.* is empty; set "
                     f"--config.{key}"):
    prompts.format_prompt("a {token} {class_name}", **kwargs)


@pytest.mark.parametrize("prompt, expected", [
    ("a sks dog on the Moon", "a dog on the Moon"),
    ("a SKS dog", "a dog"),  # CLIP lowercases: any case names the subject.
    ("sks dog, with sks!", "dog, with !"),  # punctuation ends a word.
    ("a sksy dog", "a sksy dog"),  # another word, kept.
    ("a  red   sks  dog", "a red dog"),  # single spaces between the rest.
    ("a red dog", "a red dog"),
])
def test_without_token_drops_the_token_as_a_whole_word(prompt, expected):
  assert prompts.without_token(prompt, "sks") == expected
  assert prompts.without_token(prompt, " sks ") == expected


def test_check_prompts_good_prompts_are_silent(tokenizer):
  assert not _check(tokenizer, ["a photo of sks dog", "a SKS dog, on a beach",
                                "(sks) dog"], class_name="dog")


def test_check_prompts_empty_token_or_class(tokenizer):
  with pytest.raises(UserError, match="data.unique_token"):
    _check(tokenizer, ["a photo of dog"], token="")
  with pytest.raises(UserError, match="data.class_name"):
    _check(tokenizer, ["a photo of sks dog"], class_name="  ")


def test_check_prompts_missing_token_warns_once(tokenizer):
  warnings = _check(tokenizer, ["a photo of a dog", "a photo of a dog",
                                "a sksy dog", "a sks dog"])
  assert len(warnings) == 2
  assert "'a photo of a dog'" in warnings[0] and "'sks'" in warnings[0]
  assert "'a sksy dog'" in warnings[1]


def test_check_prompts_long_prompt_warns_with_count(tokenizer):
  words = " ".join(["red"] * 80)
  long_prompt = f"a sks dog {words}"
  count = int(tokenizer_lib.count_tokens(tokenizer, long_prompt)[0])
  assert count == 85  # start + "a sks dog" (3) + 80 + end.
  warnings = _check(tokenizer, [long_prompt, "a sks dog " + " ".join(
      ["red"] * 72)])  # 77 tokens exactly: fits.
  assert len(warnings) == 1
  assert "has 85 tokens" in warnings[0]
  assert "truncated to 77 tokens" in warnings[0]


def test_check_prompts_quotes_newlines_on_one_line(tokenizer):
  warnings = _check(tokenizer, ["a dog\non a rug"])
  assert len(warnings) == 1 and "'a dog\\non a rug'" in warnings[0]
