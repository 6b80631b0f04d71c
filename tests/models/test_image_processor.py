"""ImageProcessor against transformers' image processors (PIL backend)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import pytest
import transformers
from PIL import Image

from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import image_processor, presets
from personalize_jax.models.image_processor import ImageProcessor

# The preprocessor_config.json files of the models the project evaluates with.
_CONFIGS = {
    "dinov2": {  # facebook/dinov2-small / -base
        "image_processor_type": "BitImageProcessor", "resample": 3,
        "size": {"shortest_edge": 256}, "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225]},
    "dino": {  # facebook/dino-vits16 (a legacy feature-extractor file)
        "feature_extractor_type": "ViTFeatureExtractor", "do_resize": True,
        "size": 224, "resample": 2, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225]},
    "clip": {  # openai/clip-vit-large-patch14 (legacy, int sizes)
        "feature_extractor_type": "CLIPFeatureExtractor", "do_resize": True,
        "size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]},
    # Smaller than the crop (zero padding), Lanczos, no normalisation.
    "padded": {"image_processor_type": "CLIPImageProcessor", "resample": 1,
               "size": {"shortest_edge": 20},
               "crop_size": {"height": 24, "width": 30},
               "do_normalize": False},
}
# Pillow 13 runs the vertical pass first for some shapes; older Pillow always
# starts horizontally, which changes the rounding of a few odd-shaped images.
_EXACT_ODD_SHAPES = int(PIL.__version__.split(".")[0]) >= 13


def _processors(tmp_path_factory, name):
  folder = tmp_path_factory.mktemp(name)
  (folder / image_processor.CONFIG_NAME).write_text(json.dumps(_CONFIGS[name]))
  reference = transformers.AutoImageProcessor.from_pretrained(
      folder, backend="pil")
  assert reference.backend == "pil"
  return ImageProcessor.from_pretrained(folder), reference


@pytest.fixture(scope="module", params=sorted(_CONFIGS))
def processors(request, tmp_path_factory):
  return _processors(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def photos(shared_dir):
  paths = sorted((shared_dir / "dreambench" / "dataset").glob("*/*.jpg"))
  assert paths, f"no DreamBench photos under {shared_dir}"
  # 10 photos of different subjects, 767 to 2048 px (all square).
  return {f"{p.parent.name}/{p.name}": np.asarray(Image.open(p).convert("RGB"))
          for p in paths[::16]}


def _reference_pixels(reference, image_hwc):
  out = reference(image_hwc, return_tensors="np")["pixel_values"][0]
  return out.transpose(1, 2, 0)


@pytest.mark.parametrize("name", ["clip", "dino", "dinov2"])
def test_dreambench_photos_match_transformers(name, photos, tmp_path_factory):
  ours, reference = _processors(tmp_path_factory, name)
  for path, image in photos.items():
    expected = _reference_pixels(reference, image)
    got = np.asarray(ours(image[None]))[0]
    assert got.shape == expected.shape, path
    assert np.abs(got - expected).mean() < 0.01, path
    # Pillow's integer arithmetic, bit for bit (float32 rounding aside).
    assert np.abs(got - expected).max() < 1e-4, path


@pytest.mark.parametrize("shape", [(37, 91), (300, 17), (5, 7), (64, 48)])
def test_odd_sizes_match_transformers(processors, shape):
  ours, reference = processors
  image = np.random.default_rng(sum(shape)).integers(
      0, 256, size=(*shape, 3), dtype=np.uint8)
  expected = _reference_pixels(reference, image)
  got = np.asarray(ours(image[None]))[0]
  assert got.shape == expected.shape
  assert np.abs(got - expected).mean() < 1e-3
  one_level = 1.0 / 255 / min(ours.image_std) + 1e-4
  assert np.abs(got - expected).max() < (1e-4 if _EXACT_ODD_SHAPES
                                         else one_level)


@pytest.mark.parametrize("resample", [1, 2, 3, 4, 5])
def test_every_filter_is_pillow_exactly(resample):
  ours = ImageProcessor.from_config({
      "image_processor_type": "ViTImageProcessor", "resample": resample,
      "size": {"height": 23, "width": 41}, "do_rescale": False,
      "do_normalize": False})
  rng = np.random.default_rng(resample)
  image = rng.integers(0, 256, size=(50, 30, 3), dtype=np.uint8)
  expected = np.asarray(Image.fromarray(image).resize((41, 23), resample))
  np.testing.assert_array_equal(np.asarray(ours(image[None]))[0], expected)
  # The float path uses the same weights without Pillow's rounding: compare
  # with Pillow's float ("F") images, which do not round (nor clip: keep the
  # overshoot of the filters inside [0, 255]).
  image = rng.integers(48, 208, size=(50, 30, 3), dtype=np.uint8)
  decoded = image.astype(np.float32) / 127.5 - 1.0
  got = np.asarray(ours.preprocess_decoded(jnp.asarray(decoded[None])))[0]
  for c in range(3):
    channel = Image.fromarray(image[..., c].astype(np.float32), mode="F")
    np.testing.assert_allclose(
        got[..., c], np.asarray(channel.resize((41, 23), resample)), atol=2e-3)


def _smooth_image(height: int, width: int) -> np.ndarray:
  """A photo-like uint8 image: smooth shading with a few sharp edges."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  rgb = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), x * y], -1)
  rgb[height // 3:height // 2, width // 4:] = [0.9, -0.9, 0.2]
  return np.round((rgb + 1) * 127.5).clip(0, 255).astype(np.uint8)


def test_reward_path_is_differentiable_and_matches_eval_path():
  ours = ImageProcessor.from_config(_CONFIGS["dino"])
  image = _smooth_image(150, 130)
  decoded = jnp.asarray(image[None], jnp.float32) / 127.5 - 1.0
  pixels = jax.jit(ours.preprocess_decoded)(decoded)
  # Pillow rounds each of its two passes to uint8: up to ~1 level apart.
  diff = np.abs(np.asarray(pixels) - np.asarray(ours(image[None])))
  assert diff.mean() < 0.01 and diff.max() < 1.5 / 255 / 0.224
  weights = jax.random.normal(jax.random.key(0), pixels.shape)
  grad = jax.jit(jax.grad(
      lambda x: jnp.sum(ours.preprocess_decoded(x) * weights)))(decoded)
  assert grad.shape == decoded.shape
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
  # Outside [-1, 1] nothing reaches the pixels, as when saving an image.
  assert float(jax.grad(lambda x: ours.preprocess_decoded(x).sum())(
      jnp.full((1, 8, 8, 3), 1.5))[0, 0, 0, 0]) == 0.0


def test_float_images_and_lists_of_sizes():
  ours = ImageProcessor.from_pretrained("tiny")
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
  large = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
  both = np.asarray(ours([small, large]))
  assert both.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(both[1], np.asarray(ours(large[None]))[0])
  as_float = np.asarray(ours(small[None].astype(np.float32) / 255))[0]
  assert np.abs(as_float - both[0]).max() < 1.5 / 255 / 0.26
  with pytest.raises(UserError, match="RGB"):
    ours(np.zeros((1, 8, 8, 4), np.uint8))
  with pytest.raises(UserError, match="uint8 or float"):
    ours(np.zeros((1, 8, 8, 3), np.int32))


def test_presets_and_config_errors(tmp_path):
  clip = ImageProcessor.from_pretrained("tiny")
  assert (clip.shortest_edge, clip.crop_hw) == (32, (32, 32))
  dino = ImageProcessor.from_pretrained(image_processor.TINY_DINO)
  assert (dino.resize_hw, dino.do_center_crop, dino.resample) == (
      (32, 32), False, 2)
  assert dino == ImageProcessor.from_config(presets.DINO_PROCESSOR)
  assert dino.output_hw(100, 7) == (32, 32)
  assert clip.output_hw(100, 7) == (32, 32)
  assert clip.resized_hw(100, 7) == (457, 32)

  with pytest.raises(CheckpointError, match="preprocessor_config.json"):
    ImageProcessor.from_pretrained(tmp_path)
  for bad, message in [
      ({"image_processor_type": "SiglipImageProcessor"}, "not supported"),
      ({**presets.CLIP_PROCESSOR, "resample": 0}, "resample=0"),
      ({**presets.CLIP_PROCESSOR, "size": {"longest_edge": 9}}, "size="),
  ]:
    with pytest.raises(UserError, match=message) as info:
      ImageProcessor.from_config(bad)
    assert "\n" not in str(info.value)
