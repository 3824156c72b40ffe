"""Image files as inputs: discovery, decoding and preprocessing (``inputs="images:..."``).

Where the images come from (``images:SPEC``):

- a folder: every image file below it, recursively, in the order of torchvision's ``ImageFolder``
  (files of the folder itself first, then each sub-folder in sorted order, walked with sorted
  names), which is the order RepLKNet's ``visualize_erf.py`` reads ImageNet's ``val/CLASS/*``;
- a text file (``.txt``/``.lst``): one path per line, relative to the list's folder, used in the
  listed order (blank lines and ``#`` comments ignored);
- a glob (``data/**/*.JPEG``): the matches, sorted (``**`` recurses); or one image file.

``n_inputs`` takes the FIRST n readable files of that order (no sampling); the count actually
used is reported (``ImageInputs.n``, the config's ``n_inputs``) with a warning when fewer exist.
Files that cannot be decoded (truncated, not an image, beyond Pillow's decompression-bomb limit,
which is kept) are skipped, counted and named in a warning; ``strict`` refuses them instead.

Preprocessing (``preprocess=``; every key optional, the default in brackets):

- ``resize`` [``"crop"``]: ``"crop"`` scales the shorter side to the input size / ``crop_pct`` and
  takes the centre crop (the aspect ratio is kept; torchvision's ``Resize(int)`` + ``CenterCrop``
  rounding); ``"squash"`` resizes to the input shape exactly (RepLKNet's ``Resize((S, S))``);
- ``interpolation`` [``"bilinear"``]: ``nearest``, ``bilinear``, ``bicubic``, ``lanczos``, ``box``,
  ``hamming`` (Pillow's filters, antialiased as Pillow does);
- ``crop_pct`` [1.0]; ``mean``/``std`` [ImageNet's]; ``exif`` [True]: apply the EXIF orientation
  (torchvision's and timm's loaders do not: the published protocols set it False);
- ``strict`` [False]: unreadable files raise ``ValueError`` instead of being skipped.
- ``preprocess="timm"`` uses the model's timm data config (``resolve_model_data_config``) and timm's
  own eval transform (``create_transform``), as OpenERF does.

Decoding: 8-bit images (``L``, ``RGB``, ``P``, ``RGBA``, ``CMYK``...) go through Pillow's
``convert("RGB")``/``("L")`` (alpha dropped, as torchvision's loader does; palettes expanded);
16-bit images (``I;16``, ``I``) are scaled by 1/65535 and resized in floating point, so a 16-bit
ramp stays a ramp; float images (``F``) are taken as they are (0..1).
"""
from __future__ import annotations

import glob
import hashlib
import os
import warnings
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LIST_SUFFIXES = (".txt", ".lst")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
RESIZES = ("crop", "squash", "timm")
PREPROCESS_DEFAULT: dict[str, Any] = {"resize": "crop", "interpolation": "bilinear", "crop_pct": 1.0,
                                      "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "exif": True, "strict": False}
_MAX_NAMED = 10  # unreadable files named in a warning


class ImagesWarning(UserWarning):
    """Fewer readable images than asked for, or unreadable files skipped."""


# ------------------------------------------------------------------------------ options
def resolve_preprocess(preprocess: Any, model: Any = None) -> dict[str, Any]:
    """The full preprocessing dict: defaults, updated by ``preprocess`` (a dict, ``"timm"`` or None).

    ``"timm"`` (or ``{"resize": "timm", ...}``) needs ``model`` (a module) to read its data config.
    """
    if preprocess is None:
        out = dict(PREPROCESS_DEFAULT)
    elif isinstance(preprocess, str):
        if preprocess != "timm":
            raise ValueError(f"preprocess must be None, 'timm' or a dict with keys {sorted(PREPROCESS_DEFAULT)}, "
                             f"got {preprocess!r}")
        out = dict(PREPROCESS_DEFAULT, resize="timm")
    elif isinstance(preprocess, dict):
        unknown = sorted(set(preprocess) - set(PREPROCESS_DEFAULT) - {"crop_mode", "timm_config"})
        if unknown:
            raise ValueError(f"preprocess: unknown key(s) {unknown}; valid: {sorted(PREPROCESS_DEFAULT)}")
        out = dict(PREPROCESS_DEFAULT)
        out.update(preprocess)
    else:
        raise TypeError(f"preprocess must be None, 'timm' or a dict, got {type(preprocess).__name__}")
    if out["resize"] not in RESIZES:
        raise ValueError(f"preprocess: resize must be one of {list(RESIZES)}, got {out['resize']!r}")
    if out["resize"] == "timm" and "timm_config" not in out:
        out.update(_timm_config(model))
    if out["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"preprocess: interpolation must be one of {list(INTERPOLATIONS)}, "
                         f"got {out['interpolation']!r}")
    cp = out["crop_pct"]
    if isinstance(cp, bool) or not isinstance(cp, (int, float)) or not (0 < cp <= 1):
        raise ValueError(f"preprocess: crop_pct must be a number in (0, 1], got {cp!r}")
    for key in ("mean", "std"):
        try:
            vals = tuple(float(v) for v in out[key])
        except (TypeError, ValueError):
            raise ValueError(f"preprocess: {key} must be a sequence of numbers, got {out[key]!r}") from None
        if not vals or (key == "std" and any(v <= 0 for v in vals)) or not all(np.isfinite(vals)):
            raise ValueError(f"preprocess: {key} must be finite numbers{' > 0' if key == 'std' else ''}, "
                             f"got {out[key]!r}")
        out[key] = vals
    for key in ("exif", "strict"):
        if not isinstance(out[key], bool):
            raise TypeError(f"preprocess: {key} must be True or False, got {out[key]!r}")
    return out


def _timm_config(model: Any) -> dict[str, Any]:
    if model is None:
        raise ValueError("preprocess='timm' needs the model (its timm data config)")
    try:
        from timm.data import resolve_model_data_config
    except ImportError:
        raise ImportError("preprocess='timm' needs timm (pip install 'erf-toolkit[timm]')") from None
    cfg = resolve_model_data_config(model)
    return {"resize": "timm", "interpolation": cfg.get("interpolation", "bicubic"),
            "crop_pct": float(cfg.get("crop_pct", 0.875)), "crop_mode": cfg.get("crop_mode", "center"),
            "mean": tuple(float(v) for v in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"]),
            "exif": False, "timm_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}


# ------------------------------------------------------------------------------ discovery
def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _walk_sorted(folder: str) -> list[str]:
    files = []

    def unreadable(exc: OSError) -> None:  # a sub-folder that cannot be listed is named, not fatal
        warnings.warn(f"inputs: folder {exc.filename!r} cannot be read ({exc.strerror}); its images are skipped",
                      ImagesWarning, stacklevel=2)

    for root, _dirs, names in sorted(os.walk(folder, onerror=unreadable, followlinks=True)):
        files.extend(os.path.join(root, n) for n in sorted(names) if _is_image_name(n))
    return files


def list_images(spec: str) -> tuple[str, list[str]]:
    """``(kind, paths)`` for ``images:SPEC``: kind ``folder``, ``list`` or ``glob`` (module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError("inputs: 'images:' needs a folder, a list file or a glob after the colon")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            raise ValueError(f"inputs: image folder {spec!r} cannot be read ({exc.strerror})") from None
        files = [e.path for e in entries if _is_image_name(e.name) and e.is_file()]
        for e in entries:
            if e.is_dir():
                files.extend(_walk_sorted(e.path))
        if not files:
            raise ValueError(f"inputs: no image files ({', '.join(IMAGE_SUFFIXES)}) in {spec!r} or its sub-folders")
        return "folder", files
    if os.path.isfile(path) and path.lower().endswith(LIST_SUFFIXES):
        base = os.path.dirname(os.path.abspath(path))
        try:
            with open(path, encoding="utf-8") as fh:
                lines = [ln.strip() for ln in fh]
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"inputs: image list {spec!r} cannot be read ({exc})") from None
        files = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines if ln and not ln.startswith("#")]
        if not files:
            raise ValueError(f"inputs: image list {spec!r} names no files")
        return "list", files
    if os.path.isfile(path):
        return "file", [path]
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ValueError(f"inputs: no files match the glob {spec!r}")
        return "glob", files
    raise ValueError(f"inputs: image folder {spec!r} does not exist (images: takes a folder, a .txt list of "
                     "files, a glob or one image file)")


# ------------------------------------------------------------------------------ decoding
def _pil():
    from PIL import Image, ImageOps

    return Image, ImageOps


def _filter(name: str):
    Image, _ = _pil()
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}[name]


def open_image(path: str, exif: bool):
    """Open and fully decode one file; returns ``(planes, bits)``.

    ``planes`` is one Pillow image of mode ``RGB``/``L`` (8-bit) or a list of ``F`` planes
    (16-bit and float images, scaled to 0..1). Raises OSError/ValueError for unreadable files.
    """
    Image, ImageOps = _pil()
    if os.path.isdir(path):
        raise IsADirectoryError("a directory")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # the limit is kept, as an error
        im = Image.open(path)
        im.load()
    if exif:
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im, dtype=np.float64) / 65535.0
        return [Image.fromarray(arr.astype(np.float32), mode="F")], 16
    if mode == "F":
        return [im], 32
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    return im, 8


def _resize_box(iw: int, ih: int, h: int, w: int, mode: str, crop_pct: float) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    if mode == "squash":
        return (w, h), None
    scale = max(h / ih, w / iw) / crop_pct
    nw, nh = max(w, int(iw * scale + 1e-9)), max(h, int(ih * scale + 1e-9))
    top, left = int(round((nh - h) / 2.0)), int(round((nw - w) / 2.0))
    return (nw, nh), (left, top, left + w, top + h)


class Preprocessor:
    """One decoded image -> a normalised float32 tensor ``(C, H, W)`` (see the module docstring)."""

    def __init__(self, shape: tuple[int, ...], options: dict[str, Any]):
        self.c, self.h, self.w = shape
        self.opt = options
        mean, std = options["mean"], options["std"]
        if len(mean) not in (1, self.c) or len(std) not in (1, self.c):
            if self.c == 1 and len(mean) == 3 and len(std) == 3:  # grayscale models: the mean of the RGB statistics
                mean, std = (sum(mean) / 3,), (sum(std) / 3,)
            else:
                raise ValueError(f"preprocess: mean/std need 1 or {self.c} values, got {len(mean)} and {len(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._timm = None

    def __call__(self, path: str) -> torch.Tensor:
        planes, bits = open_image(path, self.opt["exif"])
        if self.opt["resize"] == "timm":
            return self._timm_transform(planes, bits)
        flt = _filter(self.opt["interpolation"])
        if bits == 8:
            im = planes.convert("RGB" if self.c == 3 else "L")
            size, box = _resize_box(im.width, im.height, self.h, self.w, self.opt["resize"], self.opt["crop_pct"])
            im = im.resize(size, flt)
            if box is not None:
                im = im.crop(box)
            arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float().div(255)
            t = arr.permute(2, 0, 1) if self.c == 3 else arr[None]
        else:
            chans = []
            for p in planes:
                size, box = _resize_box(p.width, p.height, self.h, self.w, self.opt["resize"], self.opt["crop_pct"])
                p = p.resize(size, flt)
                if box is not None:
                    p = p.crop(box)
                chans.append(torch.from_numpy(np.asarray(p, dtype=np.float32).copy()))
            t = torch.stack(chans)
            if t.shape[0] != self.c:
                t = t.mean(0, keepdim=True) if self.c == 1 else t[:1].expand(self.c, -1, -1)
        return (t - self.mean) / self.std

    def _timm_transform(self, planes, bits) -> torch.Tensor:
        Image, _ = _pil()
        if self._timm is None:
            from timm.data import create_transform

            o = self.opt
            self._timm = create_transform(input_size=(self.c, self.h, self.w), interpolation=o["interpolation"],
                                          mean=o["mean"], std=o["std"], crop_pct=o["crop_pct"],
                                          crop_mode=o.get("crop_mode", "center"), is_training=False)
        if bits == 8:
            im = planes.convert("RGB")
        else:
            arr = np.clip(np.round(np.asarray(planes[0], dtype=np.float64) * 255), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr, mode="L").convert("RGB")
        t = self._timm(im)
        return t if self.c == 3 else t.mean(0, keepdim=True)


# ------------------------------------------------------------------------------ the source
class ImageInputs:
    """The first ``n`` readable images of ``images:SPEC``, preprocessed; the same for every draw."""

    random_access = True

    def __init__(self, spec: str, shape: tuple[int, ...], n: int, preprocess: Any = None):
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(f"inputs='images:...' needs input_shape (1 or 3, H, W), got {shape}")
        self.spec, self.shape, self.asked = spec, shape, n
        self.options = resolve_preprocess(preprocess)
        self.pre = Preprocessor(shape, self.options)
        self.kind, candidates = list_images(spec)
        self.files: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        for path in candidates:
            if len(self.files) == n:
                break
            try:
                open_image(path, self.options["exif"])
            except Exception as exc:  # noqa: BLE001 - any decoder failure makes the file unreadable
                self.skipped.append((path, _reason(exc)))
                continue
            self.files.append(path)
        self.n_candidates = len(candidates)
        if self.skipped:
            named = ", ".join(f"{os.path.relpath(p, self._root())} ({why})" for p, why in self.skipped[:_MAX_NAMED])
            more = f" and {len(self.skipped) - _MAX_NAMED} more" if len(self.skipped) > _MAX_NAMED else ""
            msg = f"inputs: {len(self.skipped)} unreadable file(s) in {spec!r}: {named}{more}"
            if self.options["strict"]:
                raise ValueError(msg + " (strict: refusing to run; remove them or drop strict)")
            warnings.warn(msg + "; skipped", ImagesWarning, stacklevel=6)
        if not self.files:
            raise ValueError(f"inputs: no readable image in {spec!r} ({len(self.skipped)} unreadable)")
        if len(self.files) < n:
            warnings.warn(f"inputs: n_inputs={n} but {spec!r} holds only {len(self.files)} readable image(s); "
                          f"using {len(self.files)}", ImagesWarning, stacklevel=6)
        self.n = len(self.files)

    def _root(self) -> str:
        path = os.path.expanduser(self.spec)
        if os.path.isdir(path):
            return path
        if self.kind == "list":
            return os.path.dirname(os.path.abspath(path))
        return os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p, _ in self.skipped] or ["."])

    def get(self, draw: int, start: int, stop: int) -> torch.Tensor:
        out = []
        for p in self.files[start:stop]:
            try:
                out.append(self.pre(p))
            except Exception as exc:  # noqa: BLE001 - changed on disk since it was checked
                raise ValueError(f"inputs: image {p!r} became unreadable during the run ({_reason(exc)})") from None
        return torch.stack(out)

    def describe(self) -> str:
        return f"images:{self.spec}"

    def provenance(self) -> dict[str, Any]:
        """Where the inputs came from: kind, path, counts, skipped files, a hash of (name, size) pairs."""
        h = hashlib.sha256()
        root = os.path.abspath(os.path.expanduser(self.spec)) if self.kind == "folder" else None
        for p in sorted(self.files):
            name = os.path.relpath(p, root) if root else os.path.abspath(p)
            h.update(f"{name}\t{os.path.getsize(p)}\n".encode())
        return {"kind": self.kind, "spec": self.spec, "path": os.path.abspath(os.path.expanduser(self.spec)),
                "files_found": self.n_candidates, "files_used": self.n, "n_inputs_asked": self.asked,
                "skipped": len(self.skipped),
                "skipped_files": [f"{p} ({why})" for p, why in self.skipped[:_MAX_NAMED]],
                "first_file": self.files[0], "last_file": self.files[-1],
                "files_sha256": h.hexdigest(),
                "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}}


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "truncated" in text:
        return "truncated"
    if type(exc).__name__ == "UnidentifiedImageError":
        return "not an image"
    if type(exc).__name__ in ("DecompressionBombError", "DecompressionBombWarning"):
        return "over Pillow's decompression-bomb limit"
    if isinstance(exc, IsADirectoryError):
        return "a directory"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return (text[:80] or type(exc).__name__)
