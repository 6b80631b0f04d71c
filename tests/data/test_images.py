"""Tests for personalize_jax.data.images: every unusual or broken file is built here."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from personalize_jax.data import images
from personalize_jax.errors import UserError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _save(path, image, **kwargs):
  image.save(path, **kwargs)
  return path


def _one_line_error(call, *fragments):
  """Runs ``call``, expecting a one-line UserError holding every fragment."""
  with pytest.raises(UserError) as info:
    call()
  message = str(info.value)
  assert "\n" not in message
  for fragment in fragments:
    assert str(fragment) in message, message
  return message


def _png_claiming_size(width, height):
  """A PNG whose header claims ``width x height`` (only the header is read)."""
  buf = io.BytesIO()
  Image.new("L", (1, 1)).save(buf, "PNG")
  data = bytearray(buf.getvalue())
  ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
  data[16:29] = ihdr
  data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
  return bytes(data)


# load_image: unusual but valid images ----------------------------------------


def test_rgb_non_square_exact(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (70, 100, 3), np.uint8)
  out = images.load_image(_save(tmp_path / "a.png", Image.fromarray(rgb)))
  assert out.dtype == np.uint8 and out.shape == (70, 100, 3)
  np.testing.assert_array_equal(out, rgb)


def test_grayscale_becomes_three_equal_channels(tmp_path):
  gray = np.arange(64 * 80, dtype=np.uint32).reshape(64, 80) % 256
  path = _save(tmp_path / "g.png", Image.fromarray(gray.astype(np.uint8), "L"))
  out = images.load_image(path)
  assert out.shape == (64, 80, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
  values = np.zeros((64, 64), np.uint16)
  values[0, :4] = [0, 1000, 25700, 65535]
  image = Image.fromarray(values)
  assert image.mode == "I;16"
  out = images.load_image(_save(tmp_path / "deep.png", image))
  # 65535 -> 255; PIL's own convert("RGB") would clip 1000 and 25700 to 255.
  np.testing.assert_array_equal(out[0, :4, 0], [0, 4, 100, 255])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_cmyk_jpeg(tmp_path):
  image = Image.new("CMYK", (80, 72), (0, 255, 255, 0))  # pure red ink.
  out = images.load_image(_save(tmp_path / "print.jpg", image, quality=95))
  assert out.shape == (72, 80, 3)
  np.testing.assert_allclose(out.reshape(-1, 3).mean(0), RED, atol=3)


def test_rgba_composited_on_white(tmp_path):
  rgba = np.zeros((64, 64, 4), np.uint8)
  rgba[:, :32] = (255, 0, 0, 255)  # opaque red
  rgba[:, 32:48] = (0, 0, 0, 0)  # fully transparent black
  rgba[:, 48:] = (0, 0, 0, 128)  # half transparent black
  out = images.load_image(_save(tmp_path / "cut.png", Image.fromarray(rgba)))
  np.testing.assert_array_equal(out[0, 0], RED)
  np.testing.assert_array_equal(out[0, 40], (255, 255, 255))
  np.testing.assert_array_equal(out[0, 60], (127, 127, 127))


def test_la_png_composited_on_white(tmp_path):
  la = np.zeros((64, 64, 2), np.uint8)
  la[:32] = (40, 255)
  la[32:] = (40, 0)
  out = images.load_image(_save(tmp_path / "la.png", Image.fromarray(la, "LA")))
  np.testing.assert_array_equal(out[0, 0], (40, 40, 40))
  np.testing.assert_array_equal(out[63, 0], (255, 255, 255))


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparency_composited_on_white(tmp_path, suffix):
  image = Image.new("P", (64, 64), 0)
  image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
  image.paste(1, (0, 0, 32, 64))  # left half: palette entry 1, blue.
  path = _save(tmp_path / f"p{suffix}", image, transparency=0)
  out = images.load_image(path)
  np.testing.assert_array_equal(out[0, 0], BLUE)
  np.testing.assert_array_equal(out[0, 63], (255, 255, 255))


def test_exif_orientation_rotates_upright(tmp_path):
  image = Image.new("RGB", (120, 80), BLUE)  # stored landscape, 120 wide.
  image.paste(RED, (0, 0, 16, 16))  # marker in the stored top-left corner.
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display".
  out = images.load_image(_save(tmp_path / "phone.jpg", image, exif=exif,
                                quality=95))
  assert out.shape == (120, 80, 3)  # portrait: height 120, width 80.
  # Turning clockwise carries the top-left corner to the top-right.
  np.testing.assert_allclose(out[2:12, -12:-2].reshape(-1, 3).mean(0), RED,
                             atol=8)
  np.testing.assert_allclose(out[2:12, 2:12].reshape(-1, 3).mean(0), BLUE,
                             atol=8)


def test_webp_lossless_exact(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, (66, 90, 3), np.uint8)
  path = _save(tmp_path / "w.webp", Image.fromarray(rgb), lossless=True)
  np.testing.assert_array_equal(images.load_image(path), rgb)


def test_unicode_file_name(tmp_path):
  path = _save(tmp_path / "фото собаки 🐶 ü.png", Image.new("RGB", (64, 64),
                                                          GREEN))
  out = images.load_image(path)
  np.testing.assert_array_equal(out[10, 10], GREEN)


def test_animated_gif_gives_first_frame(tmp_path):
  frames = [Image.new("RGB", (64, 64), c) for c in (RED, BLUE)]
  path = tmp_path / "anim.gif"
  frames[0].save(path, save_all=True, append_images=frames[1:])
  np.testing.assert_array_equal(images.load_image(path)[5, 5], RED)


def test_8000x6000_photo_loads_reduced(tmp_path):
  image = Image.new("RGB", (8000, 6000), (20, 120, 200))
  path = _save(tmp_path / "big.jpg", image, quality=80)
  out = images.load_image(path)
  # Decoded at 1/2 scale: the shorter side stays >= KEEP_SIDE.
  assert out.shape == (3000, 4000, 3)
  np.testing.assert_allclose(out[1500, 2000], (20, 120, 200), atol=3)


def test_large_png_is_reduced_keeping_the_shorter_side(tmp_path, monkeypatch):
  monkeypatch.setattr(images, "KEEP_SIDE", 32)
  rgb = np.zeros((70, 100, 3), np.uint8)
  rgb[:, 50:] = 200
  out = images.load_image(_save(tmp_path / "a.png", Image.fromarray(rgb)))
  assert out.shape == (35, 50, 3)  # factor 70 // 32 = 2.
  np.testing.assert_array_equal(out[0, [0, 24, 25, 49], 0], [0, 0, 200, 200])


def test_pil_settings_are_restored(tmp_path, monkeypatch):
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  before = Image.MAX_IMAGE_PIXELS
  images.load_image(_save(tmp_path / "a.png", Image.new("RGB", (64, 64))))
  assert ImageFile.LOAD_TRUNCATED_IMAGES is True
  assert Image.MAX_IMAGE_PIXELS == before


# load_image: errors -----------------------------------------------------------


def test_text_with_jpg_suffix_is_not_an_image(tmp_path):
  path = tmp_path / "notes.jpg"
  path.write_text("these are my notes, not a photo\n")
  _one_line_error(lambda: images.load_image(path), path, "not an image",
                  "remove it")


@pytest.mark.parametrize("cut", [2, 500, 3000])
@pytest.mark.parametrize("truncated_allowed_globally", [False, True])
def test_truncated_jpeg_is_detected(tmp_path, monkeypatch, cut,
                                    truncated_allowed_globally):
  # Another library may switch PIL to silently grey-fill cut files.
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES",
                      truncated_allowed_globally)
  rgb = np.random.default_rng(2).integers(0, 256, (96, 128, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, "JPEG", quality=90)
  path = tmp_path / "cut.jpg"
  path.write_bytes(buf.getvalue()[:-cut])
  _one_line_error(lambda: images.load_image(path), path, "truncated",
                  "re-copy")


def test_too_small_names_size_minimum_and_config_key(tmp_path):
  path = _save(tmp_path / "thumb.png", Image.new("RGB", (50, 80)))
  _one_line_error(lambda: images.load_image(path, min_side=64), path, "50x80",
                  "64", "data.min_image_side")
  assert images.load_image(path, min_side=50).shape == (80, 50, 3)


def test_over_the_pixel_limit(tmp_path):
  path = tmp_path / "huge.png"
  path.write_bytes(_png_claiming_size(20000, 15000))
  _one_line_error(lambda: images.load_image(path), path, "20000x15000",
                  "300 MP", "downscale")


def test_missing_file(tmp_path):
  _one_line_error(lambda: images.load_image(tmp_path / "gone.jpg"),
                  tmp_path / "gone.jpg", "does not exist")


# load_instance_images ---------------------------------------------------------


def _folder_of(tmp_path, names):
  folder = tmp_path / "photos"
  folder.mkdir()
  for i, name in enumerate(names):
    _save(folder / name, Image.new("RGB", (64 + i, 64), (i, 0, 0)),
          format="PNG")
  return folder


def test_folder_sorted_and_filtered(tmp_path):
  folder = _folder_of(tmp_path, ["b.png", "a.JPG", "c.webp", ".hidden.jpg",
                                 "._a.jpg"])
  (folder / "captions.txt").write_text("a photo of sks mug")
  (folder / "meta.json").write_text("{}")
  (folder / "nested.png").mkdir()
  got, names = images.load_instance_images(folder)
  assert names == ["a.JPG", "b.png", "c.webp"]
  # Widths 64 + i record the creation order: a.JPG was second, b.png first.
  assert [im.shape[1] for im in got] == [65, 64, 66]


def test_missing_folder(tmp_path):
  _one_line_error(lambda: images.load_instance_images(tmp_path / "nope"),
                  tmp_path / "nope", "does not exist", "data.instance_dir")


def test_file_instead_of_folder(tmp_path):
  path = _save(tmp_path / "one.png", Image.new("RGB", (64, 64)))
  _one_line_error(lambda: images.load_instance_images(path), path,
                  "not a folder", "data.instance_dir")


def test_empty_folder(tmp_path):
  _one_line_error(lambda: images.load_instance_images(tmp_path), tmp_path,
                  "is empty", "data.instance_dir")


def test_folder_without_images_lists_what_it_holds(tmp_path):
  (tmp_path / "IMG_0001.HEIC").write_bytes(b"\0" * 10)
  _one_line_error(lambda: images.load_instance_images(tmp_path),
                  "IMG_0001.HEIC", "no images", "data.instance_dir")


def test_bad_file_among_good_ones_fails_with_skip_hint(tmp_path):
  folder = _folder_of(tmp_path, ["a.png", "c.png"])
  (folder / "b.jpg").write_text("not a photo")
  _one_line_error(lambda: images.load_instance_images(folder),
                  folder / "b.jpg", "--config.data.skip_bad_images=true")


def test_skip_bad_images_warns_once_per_file_and_goes_on(tmp_path):
  folder = _folder_of(tmp_path, ["a.png", "c.png"])
  (folder / "b.jpg").write_text("not a photo")
  _save(folder / "d.png", Image.new("RGB", (20, 20)))  # too small
  warnings = []
  got, names = images.load_instance_images(folder, skip_bad_images=True,
                                           warn=warnings.append)
  assert names == ["a.png", "c.png"] and len(got) == 2
  assert len(warnings) == 2
  assert str(folder / "b.jpg") in warnings[0]
  assert str(folder / "d.png") in warnings[1]
  assert all("\n" not in w for w in warnings)


def test_no_usable_image_fails_even_when_skipping(tmp_path):
  (tmp_path / "x.jpg").write_text("nope")
  _one_line_error(
      lambda: images.load_instance_images(tmp_path, skip_bad_images=True,
                                          warn=lambda _: None),
      "none of the 1 image files", tmp_path / "x.jpg", "data.instance_dir")


@pytest.mark.parametrize("subject", ["dog", "bear_plushie"])  # JPEG, MPO
def test_dreambench_photos_load(shared_dir, subject):
  folder = shared_dir / "dreambench" / "dataset" / subject
  got, names = images.load_instance_images(folder)
  assert names == sorted(p.name for p in folder.glob("*.jpg"))
  for image, name in zip(got, names):
    with Image.open(folder / name) as reference:
      np.testing.assert_array_equal(image, np.asarray(reference.convert("RGB")))


# preprocess and flip ----------------------------------------------------------


def test_preprocess_shape_range_and_extremes():
  rgb = np.random.default_rng(3).integers(0, 256, (100, 150, 3), np.uint8)
  out = images.preprocess(rgb, 64)
  assert out.dtype == np.float32 and out.shape == (64, 64, 3)
  assert out.min() >= -1.0 and out.max() <= 1.0
  np.testing.assert_array_equal(
      images.preprocess(np.full((80, 120, 3), 255, np.uint8), 32), 1.0)
  np.testing.assert_array_equal(
      images.preprocess(np.zeros((80, 120, 3), np.uint8), 32), -1.0)


def _thirds(vertical):
  """300x100 (or 100x300) with red, green and blue thirds along the long side."""
  rgb = np.zeros((100, 300, 3), np.uint8)
  for i in range(3):
    rgb[:, 100 * i:100 * (i + 1), i] = 255
  return rgb.transpose(1, 0, 2) if vertical else rgb


@pytest.mark.parametrize("vertical", [False, True])
def test_center_crop_keeps_the_middle(vertical):
  out = images.preprocess(_thirds(vertical), 50)
  assert out.shape == (50, 50, 3)
  # 300x100 -> 150x50, crop offset 50: exactly the green third (bilinear
  # blends only at the edges).
  np.testing.assert_array_equal(out[2:-2, 2:-2], np.broadcast_to(
      np.array([-1.0, 1.0, -1.0], np.float32), (46, 46, 3)))


def test_without_center_crop_the_whole_image_is_squashed():
  out = images.preprocess(_thirds(False), 60, center_crop=False)
  assert out.shape == (60, 60, 3)
  np.testing.assert_array_equal(out[30, [2, 30, 57]],
                                [[1, -1, -1], [-1, 1, -1], [-1, -1, 1]])


def test_crop_offset_rounds_like_torchvision():
  # 101 wide, 100 high at 100: no resize, one spare column, offset round(0.5)=0.
  rgb = np.zeros((100, 101, 3), np.uint8)
  rgb[:, 0] = 255
  out = images.preprocess(rgb, 100)
  np.testing.assert_array_equal(out[:, 0], 1.0)
  np.testing.assert_array_equal(out[:, 1:], -1.0)


def test_flip():
  rgb = np.arange(2 * 3 * 4 * 3).reshape(2, 3, 4, 3)
  np.testing.assert_array_equal(images.flip(rgb[0])[:, 0], rgb[0][:, -1])
  np.testing.assert_array_equal(images.flip(rgb)[1, :, 0], rgb[1, :, -1])
  np.testing.assert_array_equal(images.flip(images.flip(rgb)), rgb)
