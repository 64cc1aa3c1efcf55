"""Decode uploaded patches into the uint8 RGB arrays the graph takes, refusing what is unsafe.

Every refusal is a :class:`BadImage` whose message names the file and the problem, so the HTTP
service can answer 4xx and carry on serving.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A histology patch is a few hundred pixels a side; 50 MPix is generous and stops bombs early.
MAX_PIXELS = 50_000_000
ALLOWED_FORMATS = {"PNG", "JPEG", "TIFF", "WEBP", "BMP"}
_ORIENTATION = 0x0112  # EXIF tag
SAFE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "I;16", "I;16B", "I;16L", "I", "1"}


class BadImage(ValueError):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert the modes that have one obvious RGB meaning; refuse the rest clearly."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # slide glass is white
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "P", "1", "CMYK"):
        return image.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: scale the full 0..65535 range to 8 bits (no silent clipping at 255)
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    raise BadImage(f"{name}: unsupported image mode {mode!r} (use 8-bit RGB, RGBA, greyscale, palette or CMYK)")


def load_rgb(data: bytes, name: str, input_size: int, min_side: int) -> np.ndarray:
    """Decode ``data`` to uint8 ``[input_size, input_size, 3]`` (bilinear, as in training)."""
    if not data:
        raise BadImage(f"{name}: empty file", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImage(
                    f"{name}: declared size {width}x{height} exceeds the {MAX_PIXELS // 1_000_000} MPix limit "
                    "(send patches, not slides)",
                    413,
                )
            if image.format not in ALLOWED_FORMATS:
                raise BadImage(f"{name}: format {image.format} not accepted (PNG, JPEG, TIFF, WebP)", 415)
            image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"{name}: refused as a decompression bomb ({exc})", 413) from None
    except UnidentifiedImageError:
        raise BadImage(f"{name}: not an image (PNG, JPEG, TIFF or WebP expected)", 415) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"{name}: truncated or corrupt image ({exc})", 422) from None
    if min(width, height) < min_side:
        raise BadImage(
            f"{name}: {width}x{height} px is far smaller than the model's {min_side * 2} px patch "
            f"(minimum side {min_side} px)",
            422,
        )
    if image.getexif().get(_ORIENTATION, 1) != 1:
        # a photo taken with the camera turned stores its pixels unrotated plus this tag; viewers
        # (and the pathologist) see the patch turned, so the model must see it the same way
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise BadImage(f"{name}: corrupt EXIF orientation ({exc})", 422) from None
    rgb = _to_rgb(image, name)
    if rgb.size != (input_size, input_size):
        rgb = rgb.resize((input_size, input_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
