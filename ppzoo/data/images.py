"""Built-in image-text data: synthetic scenes drawn with Pillow, and handwritten digits from scikit-learn.

Nothing is downloaded. Both sets pair a 32x32 RGB image with a caption from a small closed grammar and with
the attribute labels the caption states, so generated images and captions can be judged exactly.

**Scenes.** One kind of object (shape, color, size) repeated `count` times inside one half of the canvas
(`position`): "two small red circles on the left". The attributes are independent and uniformly drawn, and
every sample is a pure function of (seed, index): the same arguments give the same images bit for bit.
The validation split holds out whole attribute combinations (33 of the 288, chosen by a stable hash): its captions
never occur in training, so caption-conditioned generation is measured on unseen compositions.

**Digits.** scikit-learn's 1,797 8x8 handwritten digits (UCI), upscaled to 32x32 and tinted with one of the
scene colors: "a red handwritten seven". Train/validation are a fixed split of the images.

**Text tokenizer.** Captions come from the grammar below, so the vocabulary is closed and known in advance:
CaptionTokenizer maps each word to one token (plus pad/eos). A word-level vocabulary makes every caption a
handful of tokens (the whole text side fits 10 positions), has no out-of-vocabulary case for generated data,
and turns caption parsing back into attributes into a table lookup. A prompt outside the grammar is a
DataError that lists the vocabulary. A trained BPE (ppzoo.data.tokenizer) would split these words into
pieces for nothing.

A sample is {"image": float32 [3, 32, 32] in [-1, 1], "text_ids": int64 [max_text_len] (caption, eos,
pads), "labels": int64 [5] attribute indices (scenes; digits use [digit, color, -1, -1, -1])}.
"""
import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ppzoo.errors import DataError
from ppzoo.registry import register_dataset

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, so edges are anti-aliased
HOLDOUT_EVERY = 8  # the validation split of scenes holds out every 8th attribute combination

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
COUNTS = ("one", "two", "three")
POSITIONS = ("left", "right", "top", "bottom")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: attribute name -> its values, in label order (labels[i] indexes ATTRIBUTES[i]'s values)
ATTRIBUTES = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZES, "count": COUNTS, "position": POSITIONS}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
OBJECT_DIAMETER = {"small": 6.0, "large": 9.0}  # pixels at 32x32


# ------------------------------------------------------------------------------------------ captions


def scene_caption(shape, color, size, count, position):
    noun = shape if count == "one" else shape + "s"
    return f"{count} {size} {color} {noun} {POSITION_PHRASES[position]}"


def digit_caption(digit, color):
    return f"a {color} handwritten {DIGIT_WORDS[digit]}"


def _vocabulary():
    words = []
    for shape in SHAPES:
        words += [shape, shape + "s"]
    words += list(COLOR_NAMES) + list(SIZES) + list(COUNTS)
    for phrase in POSITION_PHRASES.values():
        words += phrase.split()
    words += ["a", "handwritten"] + list(DIGIT_WORDS)
    return tuple(dict.fromkeys(words))  # first occurrence order, no duplicates


class CaptionTokenizer:
    """Word-level tokenizer of the caption grammar: id 0 pads, id 1 ends a caption, words from id 2."""

    PAD, EOS = 0, 1
    SPECIALS = ("<pad>", "<eos>")

    def __init__(self):
        self.words = self.SPECIALS + _vocabulary()
        self.ids = {word: i for i, word in enumerate(self.words)}

    @property
    def vocab_size(self):
        return len(self.words)

    def encode(self, caption, max_len=None):
        """Word ids of `caption` followed by eos, padded to max_len when given."""
        words = caption.lower().split()
        unknown = [w for w in words if w not in self.ids or w in self.SPECIALS]
        if unknown:
            raise DataError(
                f"The caption {caption!r} has words outside the caption vocabulary: {', '.join(unknown)}. The "
                f"vocabulary is: {' '.join(self.words[len(self.SPECIALS):])}. Captions follow the forms "
                f"'{scene_caption('circle', 'red', 'small', 'two', 'left').replace('circles', 'circle(s)')}' and "
                f"'{digit_caption(7, 'blue')}'."
            )
        ids = [self.ids[w] for w in words] + [self.EOS]
        if max_len is not None:
            if len(ids) > max_len:
                raise DataError(f"The caption {caption!r} has {len(ids) - 1} words; at most {max_len - 1} fit.")
            ids += [self.PAD] * (max_len - len(ids))
        return ids

    def decode(self, ids):
        """The caption of an id sequence, up to its first eos (pads and eos dropped)."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i != self.PAD:
                words.append(self.words[i])
        return " ".join(words)


def parse_scene_caption(caption):
    """The attribute labels a scene caption states ({name: index}); None for an attribute it does not state
    in the grammar's form (so a malformed generated caption scores as wrong, not as an error)."""
    words = caption.split()
    labels = dict.fromkeys(ATTRIBUTE_NAMES)
    if len(words) >= 1 and words[0] in COUNTS:
        labels["count"] = COUNTS.index(words[0])
    if len(words) >= 2 and words[1] in SIZES:
        labels["size"] = SIZES.index(words[1])
    if len(words) >= 3 and words[2] in COLOR_NAMES:
        labels["color"] = COLOR_NAMES.index(words[2])
    if len(words) >= 4:
        noun = words[3]
        singular = noun[:-1] if noun.endswith("s") else noun
        if singular in SHAPES:
            labels["shape"] = SHAPES.index(singular)
    phrase = " ".join(words[4:])
    for index, position in enumerate(POSITIONS):
        if phrase == POSITION_PHRASES[position]:
            labels["position"] = index
    return labels


# ------------------------------------------------------------------------------------------ drawing


def _seed_for(*parts):
    """A 64-bit seed from its parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _object_centers(rng, count, diameter, position):
    """`count` centers in the half of the canvas `position` names, spread along its long side in equal
    slots (so objects never overlap), each jittered within its slot."""
    half = IMAGE_SIZE / 2
    radius = diameter / 2
    vertical_half = position in ("left", "right")  # left/right halves are tall: spread objects downwards
    long_side, short_side = IMAGE_SIZE, half
    slot = long_side / count
    centers = []
    for k in range(count):
        # A one-pixel margin inside each slot keeps neighbours apart (they never touch after anti-aliasing).
        room = slot - diameter - 2.0
        along = k * slot + radius + 1.0 + rng.uniform(0.0, room) if room > 0 else (k + 0.5) * slot
        across = rng.uniform(radius + 1, short_side - radius - 1)
        offset = half if position in ("right", "bottom") else 0.0
        x, y = (offset + across, along) if vertical_half else (along, offset + across)
        centers.append((x, y))
    return centers


def _draw_shape(draw, shape, center, diameter, color):
    s = SUPERSAMPLE
    x, y, r = center[0] * s, center[1] * s, diameter * s / 2
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif shape == "square":
        side = r * 0.85  # a square of the same diameter looks bigger than the circle; match their areas roughly
        draw.rectangle([x - side, y - side, x + side, y + side], fill=color)
    else:
        draw.polygon([(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)], fill=color)


def draw_scene(shape, color, size, count, position, seed):
    """uint8 [32, 32, 3] image of the scene; `seed` jitters the placement and the background shade."""
    rng = np.random.default_rng(seed)
    shade = int(rng.integers(10, 40))
    canvas = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, (shade, shade, shade))
    draw = ImageDraw.Draw(canvas)
    diameter = OBJECT_DIAMETER[size]
    for center in _object_centers(rng, COUNTS.index(count) + 1, diameter, position):
        _draw_shape(draw, shape, center, diameter, COLORS[color])
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.uint8)


def to_model_range(images_uint8):
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1] (the models' input)."""
    x = np.asarray(images_uint8, dtype=np.float32) / 127.5 - 1.0
    return np.moveaxis(x, -1, -3).copy()


def to_uint8(images):
    """Model-range float [..., 3, H, W] -> uint8 [..., H, W, 3] (clipped), e.g. for PNG files."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(x, -3, -1).copy()


def load_image_file(path, size=IMAGE_SIZE):
    """An image file as float32 [3, size, size] in [-1, 1] (RGB; resized with a box filter if needed)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read the image {path}: {exc}. Give a PNG or JPEG file.") from exc
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BOX)
    return to_model_range(np.asarray(rgb, dtype=np.uint8))


# ------------------------------------------------------------------------------------------ datasets


def scene_combinations(split):
    """The attribute-index tuples (shape, color, size, count, position) a split draws from: the validation
    split holds out one combination in HOLDOUT_EVERY, chosen by a stable hash, train has the rest, and all
    has every combination (for the attribute classifier that judges generated images of held-out captions)."""
    combos = [
        (a, b, c, d, e)
        for a in range(len(SHAPES)) for b in range(len(COLOR_NAMES)) for c in range(len(SIZES))
        for d in range(len(COUNTS)) for e in range(len(POSITIONS))
    ]
    held_out = [combo for combo in combos if _seed_for("holdout", *combo) % HOLDOUT_EVERY == 0]
    if split == "validation":
        return held_out
    if split == "all":
        return combos
    held = set(held_out)
    return [combo for combo in combos if combo not in held]


class ImageTextDataset:
    """Map-style dataset of (image, caption ids, attribute labels), all generated in memory at build."""

    needs_tokenizer = False  # captions bring their own closed vocabulary (CaptionTokenizer)

    def __init__(self, images_uint8, captions, labels, max_text_len, name):
        self.tokenizer = CaptionTokenizer()
        self.images_uint8 = images_uint8
        self.captions = list(captions)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.max_text_len = int(max_text_len)
        self.text_ids = np.array([self.tokenizer.encode(c, self.max_text_len) for c in self.captions], dtype=np.int64)
        self.name = name

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index):
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {self.name} with {len(self)} samples")
        return {"image": to_model_range(self.images_uint8[index]), "text_ids": self.text_ids[index],
                "labels": self.labels[index]}

    def __repr__(self):
        return f"<{self.name}: {len(self)} image-caption pairs>"


def _check_split(name, split, splits=("train", "validation")):
    if split not in splits:
        raise DataError(f"{name} split {split!r} is unknown; use one of: {', '.join(splits)}.")


def _check_text_len(name, max_text_len, needed):
    if max_text_len < needed:
        raise DataError(f"{name} max_text_len={max_text_len} is too short: its longest caption needs {needed} "
                        "tokens (words + eos). Raise max_text_len.")


SCENE_MAX_WORDS = 7  # "three small yellow triangles at the bottom"
DIGIT_MAX_WORDS = 4  # "a red handwritten seven"


@dataclass
class SyntheticScenesConfig:
    split: str = "train"  # train | validation (held-out attribute combinations) | all
    num_samples: int = 4096
    seed: int = 0
    max_text_len: int = 10  # caption tokens incl. eos, padded


@register_dataset()
class SyntheticScenes(ImageTextDataset):
    """Pillow-drawn scenes with compositional captions and their attribute labels."""

    config_class = SyntheticScenesConfig

    @classmethod
    def build(cls, args, tokenizer=None, seq_len=None):
        args = args if args is not None else SyntheticScenesConfig()
        _check_split("SyntheticScenes", args.split, ("train", "validation", "all"))
        if args.num_samples < 1:
            raise DataError(f"SyntheticScenes num_samples must be positive, got {args.num_samples}.")
        _check_text_len("SyntheticScenes", args.max_text_len, SCENE_MAX_WORDS + 1)
        combos = scene_combinations(args.split)
        rng = np.random.default_rng(_seed_for("scenes", args.split, args.seed))
        chosen = rng.integers(0, len(combos), size=args.num_samples)
        images = np.empty((args.num_samples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        captions, labels = [], []
        for i, c in enumerate(chosen):
            combo = combos[int(c)]
            names = [values[k] for values, k in zip(ATTRIBUTES.values(), combo)]
            images[i] = draw_scene(*names, seed=_seed_for("scene", args.split, args.seed, i))
            captions.append(scene_caption(*names))
            labels.append(combo)
        return cls(images, captions, labels, args.max_text_len, name=f"SyntheticScenes({args.split})")


@dataclass
class HandwrittenDigitsConfig:
    split: str = "train"  # train | validation (every 5th image)
    seed: int = 0
    max_text_len: int = 10


@register_dataset()
class HandwrittenDigits(ImageTextDataset):
    """scikit-learn's 8x8 handwritten digits (real scans, UCI), upscaled to 32x32 and tinted, captioned."""

    config_class = HandwrittenDigitsConfig

    @classmethod
    def build(cls, args, tokenizer=None, seq_len=None):
        from sklearn.datasets import load_digits  # ships the images inside the wheel; nothing downloads

        args = args if args is not None else HandwrittenDigitsConfig()
        _check_split("HandwrittenDigits", args.split)
        _check_text_len("HandwrittenDigits", args.max_text_len, DIGIT_MAX_WORDS + 1)
        digits = load_digits()
        index = np.arange(len(digits.target))
        index = index[index % 5 == 0] if args.split == "validation" else index[index % 5 != 0]
        rng = np.random.default_rng(_seed_for("digits", args.split, args.seed))
        colors = rng.integers(0, len(COLOR_NAMES), size=len(index))
        images = np.empty((len(index), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        captions, labels = [], []
        for i, (k, c) in enumerate(zip(index, colors)):
            ink = Image.fromarray((digits.images[k] * (255.0 / 16.0)).astype(np.uint8))
            ink = np.asarray(ink.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32) / 255.0
            tint = np.array(COLORS[COLOR_NAMES[c]], dtype=np.float32)
            images[i] = np.clip(ink[..., None] * tint, 0, 255).astype(np.uint8)
            captions.append(digit_caption(int(digits.target[k]), COLOR_NAMES[c]))
            labels.append((int(digits.target[k]), int(c), -1, -1, -1))
        return cls(images, captions, labels, args.max_text_len, name=f"HandwrittenDigits({args.split})")
