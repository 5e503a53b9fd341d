"""Procedural faces: attribute-labelled, deterministic per (seed, index), drawn in memory on demand."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from orchestrator.core.scenario import CELEBA_ATTRIBUTES

# Frequencies in the shared 10,000-image CelebA subset, so procedural tasks have realistic sizes.
_FREQUENCY = dict(zip(CELEBA_ATTRIBUTES, (
    0.110, 0.266, 0.511, 0.206, 0.025, 0.148, 0.239, 0.240, 0.243, 0.145, 0.051, 0.203, 0.145, 0.059, 0.047,
    0.067, 0.064, 0.044, 0.382, 0.452, 0.422, 0.481, 0.037, 0.117, 0.834, 0.279, 0.044, 0.271, 0.077, 0.062,
    0.058, 0.482, 0.212, 0.318, 0.190, 0.048, 0.466, 0.123, 0.074, 0.777,
), strict=True))  # fmt: skip


def procedural_attributes(seed: int, num_images: int) -> np.ndarray:
    """(num_images, 40) bool attributes, a pure function of (seed, index) per row, with CelebA's frequencies
    and the obvious dependencies (one hair colour, beards and baldness on men, make-up mostly on women)."""
    rng = np.random.default_rng(seed)
    # One draw of 41 uniforms per row, row-major: row i does not depend on num_images.
    draws = rng.random((num_images, len(CELEBA_ATTRIBUTES) + 1))
    column = {name: i for i, name in enumerate(CELEBA_ATTRIBUTES)}
    attrs = draws[:, : len(CELEBA_ATTRIBUTES)] < np.array([_FREQUENCY[n] for n in CELEBA_ATTRIBUTES])

    def set_attr(name: str, values: np.ndarray) -> None:
        attrs[:, column[name]] = values

    def u(name: str) -> np.ndarray:
        return draws[:, column[name]]

    male = attrs[:, column["Male"]]
    young = attrs[:, column["Young"]]
    # Beards and baldness only on men (conditional frequencies = overall / P(male)).
    for name in ("Goatee", "Mustache", "5_o_Clock_Shadow", "Sideburns", "Bald"):
        set_attr(name, male & (u(name) < min(1.0, _FREQUENCY[name] / _FREQUENCY["Male"])))
    set_attr(
        "No_Beard",
        ~(attrs[:, column["Goatee"]] | attrs[:, column["Mustache"]] | (male & (u("No_Beard") < 0.2))),
    )
    for name in ("Wearing_Lipstick", "Heavy_Makeup", "Wearing_Earrings", "Wearing_Necklace"):
        set_attr(name, ~male & (u(name) < min(1.0, _FREQUENCY[name] / (1 - _FREQUENCY["Male"]))))
    set_attr(
        "Wearing_Necktie", male & (u("Wearing_Necktie") < _FREQUENCY["Wearing_Necktie"] / _FREQUENCY["Male"])
    )
    # Exactly one hair colour (or none of the four) from the extra uniform; grey mostly when not young.
    hair = draws[:, -1]
    bald = attrs[:, column["Bald"]]
    set_attr("Black_Hair", ~bald & (hair < 0.243))
    set_attr("Blond_Hair", ~bald & (hair >= 0.243) & (hair < 0.388))
    set_attr("Brown_Hair", ~bald & (hair >= 0.388) & (hair < 0.591))
    set_attr("Gray_Hair", ~bald & (hair >= 0.591) & (hair < 0.641) & ~young)
    return attrs


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return (
        min(255, int(colour[0] * factor)),
        min(255, int(colour[1] * factor)),
        min(255, int(colour[2] * factor)),
    )


def draw_procedural_face(seed: int, index: int, attrs: dict[str, bool], size: int = 128) -> Image.Image:
    """A face-like RGB image showing the rendered attributes; geometry and colours vary with (seed, index)."""
    rng = np.random.default_rng([seed, index])
    S = size
    line = max(1, S // 48)

    def px(x: float) -> int:  # a fraction of the image side, in pixels
        return round(x * S)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        return (px(x0), px(y0), px(x1), px(y1))

    def colour(low: int, high: int) -> tuple[int, int, int]:
        r, g, b = rng.integers(low, high, size=3)
        return (int(r), int(g), int(b))

    image = Image.new("RGB", (S, S), colour(70, 210))
    draw = ImageDraw.Draw(image)
    male, young = attrs["Male"], attrs["Young"]

    cx = 0.5 + rng.uniform(-0.04, 0.04)
    cy = 0.50 + rng.uniform(-0.03, 0.03)
    fw = rng.uniform(0.34, 0.39) * (1.15 if attrs["Chubby"] else 1.0) * (1.06 if male else 1.0)  # face width
    fh = rng.uniform(0.46, 0.51)  # face height
    top, bottom, left, right = cy - fh / 2, cy + fh / 2, cx - fw / 2, cx + fw / 2

    skin_tones = [(255, 219, 172), (241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36)]
    skin = (250, 228, 215) if attrs["Pale_Skin"] else skin_tones[int(rng.integers(0, len(skin_tones)))]
    skin = _shade(skin, rng.uniform(0.95, 1.05))
    if attrs["Black_Hair"]:
        hair = (25, 20, 20)
    elif attrs["Blond_Hair"]:
        hair = (230, 195, 110)
    elif attrs["Brown_Hair"]:
        hair = (115, 70, 40)
    elif attrs["Gray_Hair"]:
        hair = (175, 175, 175)
    else:
        hair = (150, 65, 30)  # auburn: none of the four named colours
    hair = _shade(hair, rng.uniform(0.9, 1.1))
    has_hair = not attrs["Bald"]

    # Shoulders, neck and what is worn there.
    draw.ellipse(box(cx - 0.40, 0.86, cx + 0.40, 1.35), fill=colour(20, 235))
    draw.rectangle(box(cx - fw * 0.2, bottom - 0.05, cx + fw * 0.2, 0.92), fill=_shade(skin, 0.92))
    if attrs["Wearing_Necktie"]:
        draw.polygon(
            [(px(cx), px(0.90)), (px(cx - 0.03), px(1.0)), (px(cx + 0.03), px(1.0))], fill=colour(90, 200)
        )
    if attrs["Wearing_Necklace"]:
        draw.arc(
            box(cx - fw * 0.25, 0.80, cx + fw * 0.25, 0.93), 20, 160, fill=(230, 200, 60), width=line * 2
        )

    # Hair behind the head: long for women, a short cap for men.
    if has_hair:
        if male:
            draw.ellipse(box(left - 0.02, top - 0.05, right + 0.02, cy + 0.02), fill=hair)
        else:
            draw.ellipse(box(left - 0.07, top - 0.06, right + 0.07, bottom + 0.02), fill=hair)
            draw.rectangle(box(left - 0.07, cy, right + 0.07, min(1.0, bottom + 0.14)), fill=hair)

    # Ears, face, earrings.
    for side in (-1, 1):
        ear_x = cx + side * fw / 2
        draw.ellipse(box(ear_x - 0.03, cy - 0.05, ear_x + 0.03, cy + 0.05), fill=_shade(skin, 0.95))
        if attrs["Wearing_Earrings"]:
            draw.ellipse(box(ear_x - 0.012, cy + 0.05, ear_x + 0.012, cy + 0.075), fill=(235, 205, 60))
    draw.ellipse(box(left, top, right, bottom), fill=skin)

    # Hair over the forehead; bangs come lower.
    if has_hair:
        hairline = top + fh * (0.30 if attrs["Bangs"] else 0.16)
        draw.chord(box(left, top - 0.01, right, 2 * hairline - top), 180, 360, fill=hair)

    # Beard, stubble, goatee, moustache (drawn under the mouth).
    mouth_y = cy + fh * 0.27
    beard = _shade(hair if has_hair else (60, 45, 35), 0.8)
    if male and not attrs["No_Beard"]:
        draw.chord(box(left, cy - fh * 0.05, right, bottom), 10, 170, fill=beard)
    if attrs["5_o_Clock_Shadow"]:
        for _ in range(S // 2):
            x, y = (
                rng.uniform(left + fw * 0.15, right - fw * 0.15),
                rng.uniform(mouth_y - 0.02, bottom - 0.02),
            )
            draw.point((px(x), px(y)), fill=_shade(skin, 0.6))
    if attrs["Goatee"]:
        draw.ellipse(box(cx - fw * 0.12, mouth_y + 0.03, cx + fw * 0.12, bottom + 0.005), fill=beard)

    # Eyes, make-up, eyebrows, glasses.
    eye_y = cy - fh * 0.06
    eye_dx, eye_w = fw * 0.22, fw * 0.12
    eye_h = eye_w * (0.35 if attrs["Narrow_Eyes"] else 0.6)
    iris = colour(20, 120)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        if attrs["Heavy_Makeup"]:
            draw.ellipse(
                box(ex - eye_w * 1.2, eye_y - eye_h * 2.2, ex + eye_w * 1.2, eye_y), fill=(120, 70, 130)
            )
        draw.ellipse(box(ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h), fill=(245, 245, 245))
        draw.ellipse(
            box(ex - eye_h * 0.9, eye_y - eye_h * 0.9, ex + eye_h * 0.9, eye_y + eye_h * 0.9), fill=iris
        )
        if attrs["Bags_Under_Eyes"] or not young:
            draw.arc(
                box(ex - eye_w, eye_y, ex + eye_w, eye_y + eye_h * 3),
                20,
                160,
                fill=_shade(skin, 0.7),
                width=line,
            )
        brow_width = line * (3 if attrs["Bushy_Eyebrows"] else 2)
        brow_y = eye_y - eye_h - fh * 0.07
        brow_colour = _shade(hair if has_hair else (70, 50, 40), 0.7)
        if attrs["Arched_Eyebrows"]:
            draw.arc(
                box(ex - eye_w * 1.2, brow_y, ex + eye_w * 1.2, brow_y + fh * 0.1),
                200,
                340,
                fill=brow_colour,
                width=brow_width,
            )
        else:
            draw.line(
                (px(ex - eye_w * 1.2), px(brow_y + 0.02), px(ex + eye_w * 1.2), px(brow_y + 0.02)),
                fill=brow_colour,
                width=brow_width,
            )
        if attrs["Eyeglasses"]:
            frame = box(ex - eye_w * 1.5, eye_y - eye_w * 1.1, ex + eye_w * 1.5, eye_y + eye_w * 1.1)
            draw.rectangle(frame, outline=(15, 15, 15), width=line * 2)
            draw.line(
                (px(ex + side * eye_w * 1.5), px(eye_y), px(cx + side * fw / 2), px(eye_y - 0.01)),
                fill=(15, 15, 15),
                width=line,
            )
    if attrs["Eyeglasses"]:
        draw.line(
            (px(cx - eye_dx + eye_w * 1.5), px(eye_y), px(cx + eye_dx - eye_w * 1.5), px(eye_y)),
            fill=(15, 15, 15),
            width=line * 2,
        )

    # Wrinkles when not young; rosy cheeks.
    if not young:
        for k in range(3):
            y = top + fh * (0.22 + 0.04 * k)
            draw.line(
                (px(cx - fw * 0.2), px(y), px(cx + fw * 0.2), px(y)), fill=_shade(skin, 0.8), width=line
            )
    if attrs["Rosy_Cheeks"]:
        for side in (-1, 1):
            x = cx + side * fw * 0.27
            draw.ellipse(box(x - 0.03, cy + 0.03, x + 0.03, cy + 0.08), fill=(235, 120, 130))

    # Nose.
    nose = fw * (0.09 if attrs["Big_Nose"] else 0.05)
    nose_bottom = cy + fh * 0.13
    draw.line(
        (px(cx), px(eye_y + 0.01), px(cx - nose * 0.5), px(nose_bottom)), fill=_shade(skin, 0.75), width=line
    )
    draw.line(
        (px(cx - nose), px(nose_bottom), px(cx + nose), px(nose_bottom)), fill=_shade(skin, 0.75), width=line
    )

    # Mouth: the curve smiles when Smiling, opens when Mouth_Slightly_Open; lipstick colours it.
    lips = (200, 30, 60) if attrs["Wearing_Lipstick"] else _shade(skin, 0.65)
    mouth_w = fw * 0.22
    if attrs["Mustache"]:
        draw.rectangle(box(cx - mouth_w, mouth_y - 0.04, cx + mouth_w, mouth_y - 0.015), fill=beard)
    if attrs["Mouth_Slightly_Open"]:
        draw.ellipse(
            box(cx - mouth_w * 0.6, mouth_y - 0.01, cx + mouth_w * 0.6, mouth_y + 0.035), fill=(70, 20, 25)
        )
    if attrs["Smiling"]:
        draw.arc(
            box(cx - mouth_w, mouth_y - 0.05, cx + mouth_w, mouth_y + 0.04),
            15,
            165,
            fill=lips,
            width=line * 2,
        )
    else:
        draw.arc(
            box(cx - mouth_w, mouth_y, cx + mouth_w, mouth_y + 0.06), 200, 340, fill=lips, width=line * 2
        )

    # Hat: a crown over the top of the head and a brim.
    if attrs["Wearing_Hat"]:
        hat = colour(20, 230)
        draw.rectangle(box(left + 0.02, top - 0.12, right - 0.02, top + fh * 0.12), fill=hat)
        draw.ellipse(box(left - 0.08, top + fh * 0.08, right + 0.08, top + fh * 0.2), fill=_shade(hat, 0.8))

    if attrs["Blurry"]:
        image = image.filter(ImageFilter.GaussianBlur(radius=S / 50))
    # A little sensor noise so no two faces with equal attributes are flat copies.
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(S, S, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
