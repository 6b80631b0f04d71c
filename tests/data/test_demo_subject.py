"""Tests for personalize_jax.data.demo_subject."""

import numpy as np

from personalize_jax.data import demo_subject, images


def _red_stripe_fraction(image):
  """How much of the image is the mug's stripe red."""
  r, g, b = (image[..., c].astype(int) for c in range(3))
  return float(np.mean((r > 150) & (g < 80) & (b < 80)))


def _yellow_fraction(image):
  r, g, b = (image[..., c].astype(int) for c in range(3))
  return float(np.mean((r > 200) & (g > 150) & (b < 90)))


def test_shapes_and_determinism():
  first = demo_subject.draw_subject(num_images=4, size=64, seed=3)
  again = demo_subject.draw_subject(num_images=4, size=64, seed=3)
  assert len(first) == 4
  for a, b in zip(first, again):
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)


def test_seeds_and_images_differ():
  seed0 = demo_subject.draw_subject(num_images=6, size=64, seed=0)
  seed1 = demo_subject.draw_subject(num_images=6, size=64, seed=1)
  for i in range(6):
    for j in range(i):
      assert np.abs(seed0[i].astype(int) - seed0[j]).mean() > 10, (i, j)
  assert any(not np.array_equal(a, b) for a, b in zip(seed0, seed1))


def test_every_image_shows_the_mug():
  # The same object in each: red stripes and a yellow handle, no bigger than
  # the frame and not a speck.
  for image in demo_subject.draw_subject(num_images=6, size=128, seed=5):
    assert 0.02 < _red_stripe_fraction(image) < 0.3
    assert 0.002 < _yellow_fraction(image) < 0.05


def test_write_demo_subject_files_load(tmp_path):
  folder = tmp_path / "demo" / "mug"
  paths = demo_subject.write_demo_subject(folder, num_images=3, size=64,
                                          seed=2)
  assert [p.name for p in paths] == ["subject_00.png", "subject_01.png",
                                     "subject_02.png"]
  drawn = demo_subject.draw_subject(num_images=3, size=64, seed=2)
  got, names = images.load_instance_images(folder)
  assert names == [p.name for p in paths]
  for image, expected in zip(got, drawn):
    np.testing.assert_array_equal(image, expected)
  assert demo_subject.DEMO_CLASS_NAME == "mug"
