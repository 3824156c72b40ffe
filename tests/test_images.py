"""Images as researchers have them: folders of classes, lists, globs, odd files (erf._images)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import erf
from erf._images import ImageInputs, ImagesWarning, list_images
from erf.cli import main

RAMP = np.round(np.arange(64) * 65535 / 63) / 65535  # the 16-bit ramp's values, 0..1
PLAIN = {"resize": "squash", "interpolation": "nearest", "mean": (0.0,), "std": (1.0,)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """val/ with nested classes and every awkward kind of file the loader must survive."""
    from PIL import Image

    root = tmp_path_factory.mktemp("val")
    (root / "b_class" / "deeper").mkdir(parents=True)
    (root / "a_class").mkdir()
    (root / "a-class").mkdir()
    ramp = (np.arange(64, dtype=np.float64)[None, :].repeat(8, 0) * 65535 / 63).round().astype(np.uint16)
    Image.fromarray(ramp).save(root / "a_class" / "ramp16.png")                     # 16-bit grayscale
    rng = np.random.default_rng(1)
    rgb = (rng.random((8, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb[..., 0]).save(root / "a_class" / "gray.png")                # 8-bit grayscale
    rgba = np.dstack([rgb, np.full((8, 64), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "a_class" / "rgba.png")               # alpha to drop
    Image.fromarray(rgb).quantize(16).save(root / "b_class" / "palette.png")        # palette
    marked = np.zeros((8, 16, 3), np.uint8)
    marked[0, 0] = 255                                                               # marker at top-left
    im = Image.fromarray(marked)
    exif = im.getexif()
    exif[0x0112] = 6                                                                 # rotate 90 CW to display
    im.save(root / "b_class" / "deeper" / "exif.png", exif=exif.tobytes())
    Image.fromarray(rgb).save(root / "b_class" / "trunc.jpg", quality=95)
    data = (root / "b_class" / "trunc.jpg").read_bytes()
    (root / "b_class" / "trunc.jpg").write_bytes(data[: len(data) // 2])             # truncated
    (root / "b_class" / "notes.jpg").write_text("not an image\n")                    # text named .jpg
    (root / "b_class" / "x.png").mkdir()                                             # a directory named x.png
    Image.fromarray(rgb).save(root / "a-class" / "z.png")
    Image.fromarray(rgb).save(root / "top.png")
    return root


def test_order_is_imagefolders(folder):
    kind, files = list_images(str(folder))
    rel = [str(__import__("pathlib").Path(f).relative_to(folder)) for f in files]
    assert kind == "folder"
    assert rel == ["top.png", "a-class/z.png", "a_class/gray.png", "a_class/ramp16.png", "a_class/rgba.png",
                   "b_class/notes.jpg", "b_class/palette.png", "b_class/trunc.jpg", "b_class/deeper/exif.png"]
    tv = pytest.importorskip("torchvision")
    ds = tv.datasets.ImageFolder(str(folder), loader=lambda p: p, is_valid_file=lambda p: p.endswith(".png")
                                 or p.endswith(".jpg"))
    assert [p for p, _ in ds.samples] == [f for f in files if not f.endswith("top.png")]


def test_odd_files_skipped_named_and_counted(folder):
    with pytest.warns(ImagesWarning) as rec:
        src = ImageInputs(str(folder), (3, 8, 64), 100, dict(PLAIN, mean=(0, 0, 0), std=(1, 1, 1)))
    text = " ".join(str(w.message) for w in rec)
    assert "2 unreadable" in text and "trunc.jpg (truncated)" in text and "notes.jpg (not an image)" in text
    assert "n_inputs=100" in text and "only 7 readable" in text
    assert src.n == 7 and len(src.skipped) == 2
    prov = src.provenance()
    assert prov["files_found"] == 9 and prov["files_used"] == 7 and prov["skipped"] == 2
    with pytest.raises(ValueError, match="strict.*refusing|unreadable"):
        ImageInputs(str(folder), (3, 8, 64), 100, dict(PLAIN, strict=True))


def _load(folder, name, shape, **opts):
    src = ImageInputs(str(folder / name), shape, 1, dict(PLAIN, **opts))
    return src.get(0, 0, 1)[0].numpy()


def test_decoding_of_each_kind(folder):
    from PIL import Image

    ramp = _load(folder, "a_class/ramp16.png", (1, 8, 64))
    np.testing.assert_allclose(ramp[0, 3], RAMP, atol=1e-7)          # a ramp, not garbage
    ramp3 = _load(folder, "a_class/ramp16.png", (3, 4, 32), interpolation="bilinear")
    assert np.all(np.diff(ramp3[0, 1]) > 0) and np.allclose(ramp3[0], ramp3[2])    # resized, still a ramp
    gray = _load(folder, "a_class/gray.png", (3, 8, 64))
    ref = np.asarray(Image.open(folder / "a_class" / "gray.png"), np.float32) / 255
    assert np.allclose(gray[0], ref) and np.allclose(gray[1], ref) and np.allclose(gray[2], ref)
    rgba = _load(folder, "a_class/rgba.png", (3, 8, 64))
    ref = np.asarray(Image.open(folder / "a_class" / "rgba.png"), np.float32)[..., :3] / 255
    np.testing.assert_allclose(rgba.transpose(1, 2, 0), ref, atol=1e-7)             # alpha dropped
    pal = _load(folder, "b_class/palette.png", (3, 8, 64))
    ref = np.asarray(Image.open(folder / "b_class" / "palette.png").convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(pal.transpose(1, 2, 0), ref, atol=1e-7)              # palette expanded
    rot = _load(folder, "b_class/deeper/exif.png", (3, 16, 8))                       # displayed: 16 rows x 8
    assert rot.shape == (3, 16, 8) and rot[0, 0, 7] == 1.0 and rot[0].sum() == 1.0   # marker now top-right
    raw = _load(folder, "b_class/deeper/exif.png", (3, 8, 16), exif=False)
    assert raw[0, 0, 0] == 1.0


def test_resize_modes_and_normalisation(folder):
    # shorter side + centre crop keeps the aspect ratio: an 8 x 64 ramp cropped to 8 x 8 is its middle
    mid = _load(folder, "a_class/ramp16.png", (1, 8, 8), resize="crop")
    np.testing.assert_allclose(mid[0, 0], RAMP[28:36], atol=1e-7)
    sq = _load(folder, "a_class/ramp16.png", (1, 8, 8), resize="squash", interpolation="box")
    np.testing.assert_allclose(sq[0, 0], RAMP.reshape(8, 8).mean(1), atol=1e-6)  # means of 8 columns
    norm = _load(folder, "a_class/ramp16.png", (1, 8, 64), mean=(0.5,), std=(0.25,))
    np.testing.assert_allclose(norm[0, 0], (RAMP - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="interpolation"):
        ImageInputs(str(folder), (3, 8, 8), 1, {"interpolation": "cubic"})
    with pytest.raises(ValueError, match="unknown key"):
        ImageInputs(str(folder), (3, 8, 8), 1, {"size": 3})


def test_lists_globs_bombs_and_missing(folder, tmp_path, monkeypatch):
    lst = tmp_path / "files.txt"
    lst.write_text(f"# two images and a folder\n{folder}/a_class/gray.png\n\n{folder}/b_class/x.png\n"
                   f"{folder}/top.png\n")
    with pytest.warns(ImagesWarning, match=r"x.png \(a directory\)"):
        src = ImageInputs(str(lst), (3, 8, 8), 5, None)
    assert [p.rsplit("/", 1)[1] for p in src.files] == ["gray.png", "top.png"]       # the list's order
    kind, files = list_images(f"{folder}/**/*.png")
    assert kind == "glob" and files == sorted(files) and not any(f.endswith("x.png") for f in files)
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)                             # the bomb limit is kept
    with pytest.warns(ImagesWarning, match="decompression-bomb"):
        with pytest.raises(ValueError, match="no readable image"):
            ImageInputs(f"{folder}/a_class/*.png", (3, 8, 8), 5, None)
    with pytest.raises(ValueError, match="does not exist"):
        ImageInputs(str(tmp_path / "nope"), (3, 8, 8), 5, None)
    from erf._images import _walk_sorted

    with pytest.warns(ImagesWarning, match="cannot be read"):                       # e.g. no permission
        assert _walk_sorted(str(tmp_path / "vanished")) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageInputs(str(tmp_path / "empty"), (3, 8, 8), 5, None)


def test_n_inputs_first_n_and_provenance_hash(folder, tmp_path):
    model = erf.nets.conv_stack(2, width=3, act="relu", in_channels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImagesWarning)
        r = erf.effective_rf(model, (3, 8, 8), inputs=f"images:{folder}", n_inputs=2, progress=False)
    prov = r.meta["provenance"]["inputs"]
    assert r.n == 2 and r.config["n_inputs"] == 2 and prov["files_used"] == 2
    assert prov["first_file"].endswith("top.png") and prov["last_file"].endswith("z.png")
    assert r.config["preprocess"]["resize"] == "crop"
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder / "a_class", copy / "a_class")
    h1 = ImageInputs(str(copy), (3, 8, 8), 5, None).provenance()["files_sha256"]
    assert ImageInputs(str(copy), (3, 8, 8), 5, None).provenance()["files_sha256"] == h1
    with open(copy / "a_class" / "gray.png", "ab") as fh:
        fh.write(b"\0")                                                               # one size changes
    assert ImageInputs(str(copy), (3, 8, 8), 5, None).provenance()["files_sha256"] != h1


def test_cli_images_n_inputs_strict_and_protocol(folder, tmp_path, capsys):
    base = ["map", "stack:2", "--input-shape", "3x8x8", "--no-progress", "--out", str(tmp_path), "--json"]
    assert main(base + ["--inputs", f"images:{folder}", "--n-inputs", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and out["provenance"]["inputs"]["files_used"] == 3
    assert main(base + ["--inputs", f"images:{folder}", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "trunc.jpg (truncated)" in err and err.count("\n") == 1
    assert main(base + ["--protocol", "replk"]) == 2
    assert main(base + ["--mean", "0.5,0.5,0.5"]) == 2                              # images only
    assert main(base + ["--inputs", f"images:{folder}", "--preprocess", "timm", "--mean", "0,0,0"]) == 2
    assert main(base + ["--inputs", f"images:{tmp_path / 'none'}"]) == 2
    capsys.readouterr()
    assert main(base + ["--protocol", "replknet", "--inputs", f"images:{folder}", "--n-inputs", "2", "--init", "ones"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"]["name"] == "replknet" and out["n"] == 2
    assert set(out["protocol"]["metrics"]["area_ratio"]) == {"0.2", "0.3", "0.5", "0.99"}
    assert out["provenance"]["inputs"]["preprocess"]["interpolation"] == "bicubic"
