"""Datasets become checked RGB PNGs; unusable input is refused with the file named, and nothing is written."""

import json

import numpy as np
import pytest
from PIL import Image

from conceptbench.data import prepare_dataset, read_prepared
from conceptbench.images import DataError, load_rgb

SUBJECT = {"kind": "subject", "views": 1, "caption": "", "max_images": 100, "resolution": 32, "min_side": 16}


def _photo(size=(48, 40)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_skimage_subject_gives_distinct_square_views(tmp_path):
    spec = {**SUBJECT, "skimage": ["chelsea"], "views": 3}
    rows = prepare_dataset("dog", spec, None, tmp_path / "dog")
    images = [np.asarray(Image.open(p)) for p, _ in read_prepared(tmp_path / "dog")]
    assert len(rows) == 3 and all(im.shape == (32, 32, 3) for im in images)
    assert not np.array_equal(images[0], images[2])  # different crops, not one image thrice


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "LA", "L"])
def test_odd_modes_become_rgb(tmp_path, mode):
    img = _photo()
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
    else:
        img = img.convert(mode)
    path = tmp_path / f"x.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (48, 40)
    if mode == "I;16":  # 16-bit values are scaled, not clipped to white
        assert 0 < np.asarray(rgb).mean() < 255


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty file (0 bytes)"),
        (b"not an image at all", "not a readable image"),
        ("truncated", "not a readable image"),
        ("tiny", "1x1 pixels, expected at least 16"),
    ],
)
def test_bad_images_are_refused_by_name(tmp_path, content, expected):
    src = tmp_path / "src"
    src.mkdir()
    _photo().save(src / "a.png")
    bad = src / "b.png"
    if content == "truncated":
        _photo().save(bad)
        bad.write_bytes(bad.read_bytes()[:200])
    elif content == "tiny":
        Image.new("RGB", (1, 1)).save(bad)
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError) as err:
        prepare_dataset("dog", SUBJECT, src, tmp_path / "out")
    assert str(bad) in str(err.value) and expected in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_an_image_far_smaller_than_the_resolution_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _photo((200, 150)).save(src / "small.png")  # 150 px: enough for 512 (at least 512 / 4)
    _photo((120, 100)).save(src / "smaller.png")
    spec = {**SUBJECT, "resolution": 512}
    with pytest.raises(DataError, match=r"smaller\.png: 120x100 pixels, expected at least 128 .* training at 512"):
        prepare_dataset("dog", spec, src, tmp_path / "out")
    (src / "smaller.png").unlink()
    assert len(prepare_dataset("dog", spec, src, tmp_path / "out")) == 1


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        prepare_dataset("dog", SUBJECT, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset("dog", SUBJECT, tmp_path / "nowhere", tmp_path / "out")


def test_captions_dataset_needs_every_caption(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png"):
        _photo().save(src / name)
    meta = [{"file_name": "a.png", "text": "a drawing"}, {"file_name": "b.png", "text": ""}]
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    spec = {**SUBJECT, "kind": "captions"}
    with pytest.raises(DataError, match=r"b\.png: dataset 'naruto' has captions, but this image has none"):
        prepare_dataset("naruto", spec, src, tmp_path / "out")
    (src / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="metadata.jsonl: not UTF-8"):
        prepare_dataset("naruto", spec, src, tmp_path / "out")
