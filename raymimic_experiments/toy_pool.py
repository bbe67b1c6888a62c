"""A small, learnable DataComp-layout pool with a known fraction of noisy captions.

Images (``images=``): ``"shapes"`` (default), procedurally drawn coloured shapes (a class
is ``"<colour> <shape>"``, e.g. ``"red circle"``, 16 classes) at random positions and sizes
on a noisy background, so the pool can be as large as asked and a tiny CLIP learns it in
minutes; ``"digits"``, scikit-learn's real handwritten digits (shipped inside the package),
upscaled and inked in a random colour (classes ``"handwritten seven"``, ...); or
``"mixed"``, both (26 classes). Captions describe the image with
some variety ("a small red circle on the left", "photo of a big blue square", ...). A
fraction ``noise`` of the samples is corrupted the way web captions are:

- ``swapped_caption``: the clean caption of another image (of another class),
- ``short_caption``: a one- or two-word caption ("photo", "img_0423"),
- ``boilerplate``: unrelated web text ("free shipping on all orders").

Systematic noise (``relabel``): a fraction ``relabel`` of the pool is *consistently*
mislabelled, one way, over ``relabel_pairs`` class pairs (``source -> target``, no class in two
pairs): an image of the source class gets its natural clean caption with the class name
replaced by the target's ("a small red circle on the left" -> "a small blue square on the
left"). Each pair holds ``relabel / relabel_pairs`` of the pool (expected), drawn among the
source class's clean samples; the target class keeps its own clean images. A model trained on
the pool learns the relabelling like any other pattern, so its own loss does not flag it; a
reference trained on clean data does. Kind ``relabelled``; ``caption_class`` in the ground
truth names the class the caption claims.

Written layout (the real DataComp one, so every reader path is exercised)::

    OUT/shards/{:08d}.tar             KEY.jpg, KEY.txt, KEY.json (uid, caption, sizes, status)
    OUT/shards/{:08d}.parquet         img2dataset's per-shard table
    OUT/shards/{:08d}_stats.json      img2dataset's per-shard stats
    OUT/metadata/{:08d}.parquet       DataComp metadata columns, rows in shuffled order
    OUT/metadata/{:08d}.npz           b32_img, b32_txt (512-d), l14_img, l14_txt (768-d), float16, L2-normalised
    OUT/ground_truth.parquet          uid, is_noisy, kind, label, class_name (evaluation only)
    OUT/eval/{:08d}.tar               held-out clean split, json has "cls"
    OUT/eval/classnames.json, OUT/eval/templates.json

The embeddings come from a deterministic random-projection "teacher": each attribute value
(shape, colour, position, size) has a random vector; an image embeds the vectors of its
attributes, a caption those of the attributes it mentions (a corrupted caption mentions
another image's or none), both plus independent noise. So the cosine (stored as the
``clip_*_similarity_score`` columns) is higher for matching captions, but imperfect.

Deterministic for a seed: every shard draws from its own generator seeded by
``(seed, shard index)``, so the result does not depend on how many processes write it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle", "cross")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHAPE_CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
DIGIT_CLASSES = [f"handwritten {digit}" for digit in DIGITS]
IMAGE_SOURCES = {
    # source -> (class names, fraction of samples that are scikit-learn digits)
    "shapes": (SHAPE_CLASSES, 0.0),
    "digits": (DIGIT_CLASSES, 1.0),
    "mixed": (SHAPE_CLASSES + DIGIT_CLASSES, len(DIGIT_CLASSES) / (len(SHAPE_CLASSES) + len(DIGIT_CLASSES))),
}
CLASS_NAMES = SHAPE_CLASSES  # the default source's classes
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
SIZES = ("small", "big")
TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a {}.",
]
NOISE_KINDS = ("swapped_caption", "short_caption", "boilerplate")  # random corruption, ``noise``
RELABELLED = "relabelled"  # systematic noise, ``relabel``
KINDS = ("clean",) + NOISE_KINDS + (RELABELLED,)
SHORT_CAPTIONS = ("photo", "img", "image", "dsc 0423", "untitled", "pic", "thumbnail", "file", "jpg", "view")
BOILERPLATE = (
    "free shipping on all orders over 50 dollars",
    "click here to subscribe to our newsletter",
    "copyright 2019 all rights reserved",
    "this product is currently out of stock",
    "log in to see prices and availability",
    "terms and conditions apply see store for details",
    "add to cart and save ten percent today",
    "page not found please check the address",
)
# (template, mentions size, mentions position)
CAPTION_TEMPLATES = (
    ("a {size} {cls} {pos}", True, True),
    ("photo of a {size} {cls}", True, False),
    ("{cls}, {pos}", False, True),
    ("a {cls} drawn on a grey background", False, False),
    ("an image of a {cls} {pos}", False, True),
    ("picture of one {size} {cls}", True, False),
    ("there is a {cls} {pos} of this picture", False, True),
    ("the {cls} is {size}", True, False),
)
DIGIT_TEMPLATES = (
    "a {cls} in {colour} ink",
    "a {colour} {cls}",
    "scan of a {cls} written in {colour}",
    "{cls}, {colour} on grey paper",
    "photo of a {cls}",
)
TEACHERS = {"b32": 512, "l14": 768}
# per-teacher noise: cosine of a clean pair is roughly signal / (signal + noise); the bigger
# teacher is less noisy, as L/14 separates good and bad pairs better than B/32 in DataComp
TEACHER_NOISE = {"b32": 1.6, "l14": 1.2}


@dataclass(frozen=True)
class _ShardJob:
    output: str
    index: int
    directory: str  # "shards" or "eval"
    seed: int
    first_sample: int
    uids: np.ndarray  # (n, 2) uint64
    kinds: np.ndarray  # (n,) int8 index into KINDS
    image_size: int
    write_metadata: bool
    images: str = "shapes"
    # one-way relabelling: (source class index, target class index, probability that a clean
    # sample of the source class is relabelled)
    relabel: tuple[tuple[int, int, float], ...] = ()


# ----------------------------------------------------------------------------- drawing


_SHAPE_RULES = (
    lambda dx, dy, r: dx**2 + dy**2 <= r**2,  # circle
    lambda dx, dy, r: (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85),  # square
    lambda dx, dy, r: (dy >= -r) & (dy <= r * 0.8) & (np.abs(dx) <= (dy + r) * 0.6),  # triangle, apex up
    lambda dx, dy, r: ((np.abs(dx) <= r * 0.3) | (np.abs(dy) <= r * 0.3)) & (np.abs(dx) <= r) & (np.abs(dy) <= r),  # cross
)


def draw_images(rng: np.random.Generator, n: int, size: int):
    """Draw ``n`` shape images (uint8, n x size x size x 3) in one vectorised pass; return images and attributes."""
    colour_idx = rng.integers(len(COLOURS), size=n)
    shape_idx = rng.integers(len(SHAPES), size=n)
    big = rng.random(n) < 0.5
    radius = np.where(big, rng.uniform(0.28, 0.36, n), rng.uniform(0.14, 0.2, n)) * size
    position_idx = rng.integers(len(POSITIONS), size=n)
    # position -> centre in [0, 1]: left, right, top, bottom, centre, with jitter
    centres = np.array([[0.3, 0.5], [0.7, 0.5], [0.5, 0.3], [0.5, 0.7], [0.5, 0.5]])
    cx = (centres[position_idx, 0] + rng.uniform(-0.06, 0.06, n)) * size
    cy = (centres[position_idx, 1] + rng.uniform(-0.06, 0.06, n)) * size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx = xs[None] - cx.astype(np.float32)[:, None, None]
    dy = ys[None] - cy.astype(np.float32)[:, None, None]
    r = radius.astype(np.float32)[:, None, None]
    mask = np.empty((n, size, size), dtype=bool)
    # each image only needs its own shape's mask
    for shape, rule in enumerate(_SHAPE_RULES):
        chosen = shape_idx == shape
        mask[chosen] = rule(dx[chosen], dy[chosen], r[chosen])
    grey = rng.integers(90, 170, size=(n, 1, 1, 1)).astype(np.float32)
    background = grey + 12 * rng.standard_normal(size=(n, size, size, 1), dtype=np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    colour = palette[colour_idx] + 12 * rng.standard_normal(size=(n, 3), dtype=np.float32)
    foreground = colour[:, None, None, :] + 8 * rng.standard_normal(size=(n, size, size, 3), dtype=np.float32)
    images = np.clip(np.where(mask[..., None], foreground, background), 0, 255).astype(np.uint8)
    attributes = {"colour": colour_idx, "shape": shape_idx, "big": big, "position": position_idx}
    return images, attributes


_DIGIT_IMAGES = None


def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits (8 x 8, ink 0..16), shipped inside the package."""
    global _DIGIT_IMAGES
    if _DIGIT_IMAGES is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        _DIGIT_IMAGES = (digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64))
    return _DIGIT_IMAGES


def draw_digits(rng: np.random.Generator, n: int, size: int, images: np.ndarray, attributes: dict, chosen: np.ndarray) -> None:
    """Replace the ``chosen`` images by real handwritten digits, upscaled and inked in a random colour."""
    pixels, targets = _digit_images()
    picked = rng.integers(len(pixels), size=len(chosen))
    # nearest-neighbour upscale of the 8 x 8 scan, with a one-pixel jitter so copies differ
    shift = rng.integers(-1, 2, size=(len(chosen), 2))
    grid = np.arange(size)
    rows = np.clip((grid[None, :] + shift[:, :1]) * 8 // size, 0, 7)
    cols = np.clip((grid[None, :] + shift[:, 1:]) * 8 // size, 0, 7)
    ink = pixels[picked[:, None, None], rows[:, :, None], cols[:, None, :]][..., None]
    colour_idx = rng.integers(len(COLOURS), size=len(chosen))
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    colour = palette[colour_idx][:, None, None, :]
    paper = rng.integers(150, 210, size=(len(chosen), 1, 1, 1)).astype(np.float32)
    paper = paper + 8 * rng.standard_normal(size=(len(chosen), size, size, 1), dtype=np.float32)
    images[chosen] = np.clip(paper * (1 - ink) + colour * ink, 0, 255).astype(np.uint8)
    attributes["colour"][chosen] = colour_idx
    attributes["shape"][chosen] = len(SHAPES) + targets[picked]
    attributes["big"][chosen] = True
    attributes["position"][chosen] = POSITIONS.index("in the center")


def draw_scenes(rng: np.random.Generator, n: int, size: int, source: str = "shapes"):
    """Images and attributes from the chosen source ("shapes", "digits" or "mixed")."""
    images, attributes = draw_images(rng, n, size)
    digit_fraction = IMAGE_SOURCES[source][1]
    if digit_fraction > 0:
        chosen = np.flatnonzero(rng.random(n) < digit_fraction)
        if len(chosen):
            draw_digits(rng, n, size, images, attributes, chosen)
    return images, attributes


def sample_class_names(attributes) -> list[str]:
    names = []
    for colour, shape in zip(attributes["colour"].tolist(), attributes["shape"].tolist()):
        if shape < len(SHAPES):
            names.append(f"{list(COLOURS)[colour]} {SHAPES[shape]}")
        else:
            names.append(f"handwritten {DIGITS[shape - len(SHAPES)]}")
    return names


def clean_captions(rng: np.random.Generator, attributes) -> tuple[list[str], np.ndarray]:
    """A caption per image, and per caption whether it mentions (size, position)."""
    n = len(attributes["shape"])
    template_idx = rng.integers(len(CAPTION_TEMPLATES), size=n)
    digit_template_idx = rng.integers(len(DIGIT_TEMPLATES), size=n)
    captions, mentions = [], np.zeros((n, 2), dtype=np.float32)
    colours = list(COLOURS)
    for i, name in enumerate(sample_class_names(attributes)):
        if attributes["shape"][i] >= len(SHAPES):
            captions.append(DIGIT_TEMPLATES[digit_template_idx[i]].format(cls=name, colour=colours[attributes["colour"][i]]))
            continue
        template, mentions_size, mentions_position = CAPTION_TEMPLATES[template_idx[i]]
        mentions[i] = (mentions_size, mentions_position)
        captions.append(template.format(cls=name, size=SIZES[int(attributes["big"][i])], pos=POSITIONS[attributes["position"][i]]))
    return captions, mentions


# ----------------------------------------------------------------------------- teacher embeddings


def _teacher_basis(seed: int, name: str, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7, dim])
    basis = lambda k: rng.normal(size=(k, dim)).astype(np.float32) / np.sqrt(dim)  # noqa: E731
    return {
        "colour": basis(len(COLOURS)),
        "shape": basis(len(SHAPES) + len(DIGITS)),
        "position": basis(len(POSITIONS)),
        "size": basis(len(SIZES)),
        "junk": basis(len(SHORT_CAPTIONS) + len(BOILERPLATE)),
    }


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def teacher_embeddings(seed, shard_index, image_attrs, text_attrs, text_mentions, junk_idx):
    """Image and text embeddings for both teachers; returns ({key: array}, {teacher: cosine}).

    ``text_attrs``: the attributes the caption talks about (another image's if swapped);
    ``text_mentions``: (n, 2) bool, caption mentions size / position; ``junk_idx``: index of
    the short/boilerplate text or -1.
    """
    n = len(junk_idx)
    arrays, scores = {}, {}
    for t, (name, dim) in enumerate(TEACHERS.items()):
        basis = _teacher_basis(seed, name, dim)
        rng = np.random.default_rng([seed, 11, shard_index, t])
        noise = TEACHER_NOISE[name]
        # per-sample signal strength: some images/captions are less typical, so good and
        # bad pairs overlap a little in score, as they do with a real teacher
        image_strength = rng.uniform(0.3, 1.0, size=(n, 1)).astype(np.float32)
        text_strength = rng.uniform(0.3, 1.0, size=(n, 1)).astype(np.float32)
        image = image_strength * (
            basis["colour"][image_attrs["colour"]]
            + basis["shape"][image_attrs["shape"]]
            + 0.6 * basis["position"][image_attrs["position"]]
            + 0.6 * basis["size"][image_attrs["big"].astype(int)]
        ) + (
            noise * rng.standard_normal(size=(n, dim), dtype=np.float32) / np.sqrt(dim)
        )
        text = text_strength * (
            basis["colour"][text_attrs["colour"]]
            + basis["shape"][text_attrs["shape"]]
            + 0.6 * text_mentions[:, 1:2] * basis["position"][text_attrs["position"]]
            + 0.6 * text_mentions[:, 0:1] * basis["size"][text_attrs["big"].astype(int)]
        )
        junk = junk_idx >= 0
        text[junk] = 1.5 * basis["junk"][junk_idx[junk]]
        text = text + noise * rng.standard_normal(size=(n, dim), dtype=np.float32) / np.sqrt(dim)
        image16, text16 = _normalise(image), _normalise(text)
        arrays[f"{name}_img"], arrays[f"{name}_txt"] = image16, text16
        scores[name] = np.sum(image16.astype(np.float32) * text16.astype(np.float32), axis=1)
    return arrays, scores


# ----------------------------------------------------------------------------- writing


def _tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data padded to 512 bytes), as tarfile writes it.

    Built by hand because tarfile's pure-Python header code dominated writing time;
    mtime, uid and gid are fixed so a seed gives byte-identical shards.
    """
    header = bytearray(512)
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % len(data)
    header[136:148] = b"00000000000\0"
    header[148:156] = b"        "
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    padding = (-len(data)) % 512
    return bytes(header) + data + b"\0" * padding


def _encode_jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shard(job: _ShardJob) -> dict:
    """Draw, caption, corrupt and write one shard (+ its parquet, stats and metadata); return its ground truth."""
    import pyarrow as pa

    started = time.time()
    rng = np.random.default_rng([job.seed, 1 if job.directory == "shards" else 2, job.index])
    n = len(job.uids)
    images, attrs = draw_scenes(rng, n, job.image_size, job.images)
    class_names = IMAGE_SOURCES[job.images][0]
    names = sample_class_names(attrs)
    labels = np.array([class_names.index(name) for name in names], dtype=np.int64)
    captions, mentions = clean_captions(rng, attrs)
    text_attrs = {k: v.copy() for k, v in attrs.items()}
    junk_idx = np.full(n, -1)
    texts = list(captions)
    for i in np.flatnonzero(job.kinds > 0):
        kind = KINDS[job.kinds[i]]
        if kind == "swapped_caption":
            others = np.flatnonzero(labels != labels[i])
            j = int(others[rng.integers(len(others))]) if len(others) else int(rng.integers(n))
            texts[i] = captions[j]
            for k in text_attrs:
                text_attrs[k][i] = attrs[k][j]
            mentions[i] = mentions[j]
        elif kind == "short_caption":
            junk_idx[i] = rng.integers(len(SHORT_CAPTIONS))
            texts[i] = SHORT_CAPTIONS[junk_idx[i]]
        else:
            b = rng.integers(len(BOILERPLATE))
            junk_idx[i] = len(SHORT_CAPTIONS) + b
            texts[i] = BOILERPLATE[b]

    kinds = job.kinds.copy()
    caption_class = list(names)
    if job.relabel:
        _relabel(rng, job, kinds, labels, class_names, texts, text_attrs, caption_class)
    for i in np.flatnonzero((kinds > 0) & (kinds != KINDS.index(RELABELLED))):
        caption_class[i] = ""  # a corrupted caption names no class (or another image's)

    uids = [f"{hi:016x}{lo:016x}" for hi, lo in job.uids.tolist()]
    keys = [f"{job.index:04d}{i:05d}" if n < 100000 else f"{job.index:04d}{i:06d}" for i in range(n)]
    original = (job.image_size * rng.integers(8, 33, size=(n, 2))).astype(np.int64)
    directory = os.path.join(job.output, job.directory)
    jpegs = [_encode_jpeg(image) for image in images]
    sha = [hashlib.sha256(data).hexdigest() for data in jpegs]
    urls = [f"http://toy-pool.invalid/images/{uid}.jpg" for uid in uids]
    members = []
    for i in range(n):
        meta = {
            "uid": uids[i], "url": urls[i], "key": keys[i], "caption": texts[i], "status": "success",
            "error_message": None, "width": job.image_size, "height": job.image_size,
            "original_width": int(original[i, 0]), "original_height": int(original[i, 1]),
            "exif": None, "sha256": sha[i],
        }
        if job.directory == "eval":
            meta["cls"] = int(labels[i])
        members.append(_tar_member(f"{keys[i]}.jpg", jpegs[i]))
        members.append(_tar_member(f"{keys[i]}.txt", texts[i].encode("utf-8")))
        members.append(_tar_member(f"{keys[i]}.json", json.dumps(meta).encode("utf-8")))
    with open(os.path.join(directory, f"{job.index:08d}.tar"), "wb") as f:
        f.write(b"".join(members))
        f.write(b"\0" * 1024)  # end-of-archive marker: two zero blocks
    if job.directory == "shards":
        _write_img2dataset_files(job, directory, uids, urls, keys, texts, original, sha, started)
        if job.write_metadata:
            embeddings, scores = teacher_embeddings(job.seed, job.index, attrs, text_attrs, mentions, junk_idx)
            _write_metadata(job, uids, urls, texts, original, sha, embeddings, scores, rng)
    return pa.table({
        "uid": uids, "is_noisy": kinds > 0, "kind": [KINDS[k] for k in kinds],
        "label": labels.astype(np.int64), "class_name": names, "caption_class": caption_class,
        "text": texts, "shard": np.full(n, job.index, np.int64), "key": keys,
    })


def _class_attributes(name: str) -> tuple[int, int]:
    """(colour index, shape index) of a class name, as :func:`draw_scenes` encodes them."""
    if name.startswith("handwritten "):
        return -1, len(SHAPES) + DIGITS.index(name.split(" ", 1)[1])
    colour, shape = name.split(" ", 1)
    return list(COLOURS).index(colour), SHAPES.index(shape)


def _relabel(rng, job: _ShardJob, kinds, labels, class_names, texts, text_attrs, caption_class) -> None:
    """Give clean samples of each source class the caption of its target class (in place)."""
    draws = rng.random(len(kinds))  # one draw per sample, so the choice does not depend on the pairs' order
    for source, target, probability in job.relabel:
        chosen = np.flatnonzero((kinds == 0) & (labels == source) & (draws < probability))
        source_name, target_name = class_names[source], class_names[target]
        colour, shape = _class_attributes(target_name)
        for i in chosen:
            texts[i] = texts[i].replace(source_name, target_name)
            if colour >= 0:
                text_attrs["colour"][i] = colour
            text_attrs["shape"][i] = shape
            caption_class[i] = target_name
        kinds[chosen] = KINDS.index(RELABELLED)


def relabel_pairs(seed: int, images: str, pairs: int) -> list[tuple[int, int]]:
    """``pairs`` one-way (source, target) class pairs, no class in two pairs; deterministic for a seed.

    Pairs stay within one image family (shape to shape, digit to digit), so a caption always
    describes an image the pool could contain.
    """
    names = IMAGE_SOURCES[images][0]
    families = [[i for i, n in enumerate(names) if n.startswith("handwritten ") == digit] for digit in (False, True)]
    rng = np.random.default_rng([seed, 17])
    chosen = []
    for family in sorted((f for f in families if len(f) >= 2), key=len, reverse=True):
        order = rng.permutation(family).tolist()
        chosen += [(order[2 * k], order[2 * k + 1]) for k in range(len(order) // 2)]
    if pairs > len(chosen):
        raise ValueError(f"relabel_pairs={pairs} needs {2 * pairs} distinct classes of one family; images={images!r} allows at most "
                         f"{len(chosen)} pairs")
    return [tuple(map(int, pair)) for pair in chosen[:pairs]]


def _relabel_plan(seed: int, images: str, relabel: float, pairs: int, noise: float) -> tuple[tuple[int, int, float], ...]:
    """Per pair, the probability that a clean sample of its source class is relabelled."""
    if relabel == 0:
        return ()
    names, digit_fraction = IMAGE_SOURCES[images]
    n_digits = sum(n.startswith("handwritten ") for n in names)
    plan = []
    for source, target in relabel_pairs(seed, images, pairs):
        digit = names[source].startswith("handwritten ")
        class_share = digit_fraction / n_digits if digit else (1 - digit_fraction) / (len(names) - n_digits)
        probability = (relabel / pairs) / (class_share * (1 - noise))
        if probability > 1:
            raise ValueError(f"relabel={relabel} over {pairs} pairs asks {relabel / pairs:.3f} of the pool per pair, but a class "
                             f"holds only {class_share * (1 - noise):.3f} of it once noise={noise} is drawn: use a smaller relabel "
                             "or more relabel_pairs")
        plan.append((source, target, probability))
    return tuple(plan)


def _write_img2dataset_files(job, directory, uids, urls, keys, texts, original, sha, started):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(uids)
    table = pa.table({
        "url": urls, "caption": texts, "key": keys, "status": ["success"] * n,
        "error_message": pa.array([None] * n, pa.string()), "width": [job.image_size] * n,
        "height": [job.image_size] * n, "original_width": original[:, 0], "original_height": original[:, 1],
        "exif": pa.array([None] * n, pa.string()), "sha256": sha, "uid": uids,
    })
    pq.write_table(table, os.path.join(directory, f"{job.index:08d}.parquet"))
    stats = {
        "count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
        "duration": round(time.time() - started, 3), "start_time": 0, "end_time": 0,
        "status_dict": {"success": n},
    }
    with open(os.path.join(directory, f"{job.index:08d}_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)


def _write_metadata(job, uids, urls, texts, original, sha, embeddings, scores, rng):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # DataComp metadata is not in shard order: shuffle rows so readers must join by uid
    order = rng.permutation(len(uids))
    table = pa.table({
        "uid": [uids[i] for i in order], "url": [urls[i] for i in order], "text": [texts[i] for i in order],
        "original_width": original[order, 0], "original_height": original[order, 1],
        "clip_b32_similarity_score": scores["b32"][order].astype(np.float32),
        "clip_l14_similarity_score": scores["l14"][order].astype(np.float32),
        "face_bboxes": pa.array([[] for _ in order], pa.list_(pa.list_(pa.float64()))),
        "sha256": [sha[i] for i in order],
    })
    base = os.path.join(job.output, "metadata", f"{job.index:08d}")
    pq.write_table(table, base + ".parquet")
    np.savez(base + ".npz", **{key: value[order] for key, value in embeddings.items()})


def _uids(seed: int, stream: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, stream])
    uids = rng.integers(0, 2**64, size=(n, 2), dtype=np.uint64)
    # 128 random bits practically never collide, but a duplicate would break the pool's contract
    if len(np.unique(uids, axis=0)) != n:
        raise RuntimeError("uid collision; use another seed")
    return uids


def _noise_kinds(seed: int, n: int, noise: float) -> np.ndarray:
    """Exactly round(noise * n) noisy samples, the kinds split as evenly as possible."""
    rng = np.random.default_rng([seed, 3])
    kinds = np.zeros(n, dtype=np.int8)
    noisy = rng.permutation(n)[: int(round(noise * n))]
    kinds[noisy] = 1 + np.arange(len(noisy)) % len(NOISE_KINDS)
    return kinds


def make_toy_pool(
    output: str,
    samples: int,
    noise: float,
    seed: int = 0,
    shard_size: int = 10000,
    eval_samples: int = 1600,
    image_size: int = 32,
    workers: int | None = None,
    images: str = "shapes",
    relabel: float = 0.0,
    relabel_pairs: int = 4,
) -> dict:
    """Write a toy DataComp pool to the local directory ``output``; return a summary dict."""
    if images not in IMAGE_SOURCES:
        raise ValueError(f"images must be one of {list(IMAGE_SOURCES)}, got {images!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise is a fraction in [0, 1], got {noise}")
    if not 0.0 <= relabel < 1.0 or relabel_pairs < 1:
        raise ValueError(f"relabel is a fraction in [0, 1) and relabel_pairs >= 1, got {relabel} and {relabel_pairs}")
    plan = _relabel_plan(seed, images, relabel, relabel_pairs, noise)
    if shard_size < 1 or image_size < 8 or eval_samples < 0:
        raise ValueError(f"need shard_size >= 1, image_size >= 8, eval_samples >= 0 (got {shard_size}, {image_size}, {eval_samples})")
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.time()
    for sub in ("shards", "metadata", "eval"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    all_uids = _uids(seed, 4, samples + eval_samples)  # drawn together so eval uids never collide with pool uids
    uids, eval_uids = all_uids[:samples], all_uids[samples:]
    kinds = _noise_kinds(seed, samples, noise)
    jobs = [
        _ShardJob(
            output, i, "shards", seed, start, uids[start : start + shard_size], kinds[start : start + shard_size], image_size, True, images,
            plan,
        )
        for i, start in enumerate(range(0, samples, shard_size))
    ]
    jobs += [
        _ShardJob(
            output, i, "eval", seed, start, eval_uids[start : start + shard_size],
            np.zeros(len(eval_uids[start : start + shard_size]), np.int8), image_size, False, images,
        )
        for i, start in enumerate(range(0, eval_samples, shard_size))
    ]
    workers = workers or min(os.cpu_count() or 1, len(jobs))
    if workers > 1:
        import multiprocessing

        # spawn, not fork: the caller may have Ray or torch threads running
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(write_shard, jobs))
    else:
        results = [write_shard(job) for job in jobs]
    truth = [r for job, r in zip(jobs, results) if job.directory == "shards"]
    pq.write_table(pa.concat_tables(truth), os.path.join(output, "ground_truth.parquet"))
    with open(os.path.join(output, "eval", "classnames.json"), "w") as f:
        json.dump(IMAGE_SOURCES[images][0], f, indent=1)
    with open(os.path.join(output, "eval", "templates.json"), "w") as f:
        json.dump(TEMPLATES, f, indent=1)
    kinds_written = pa.concat_tables(truth).column("kind").to_pylist()
    counts = {kind: kinds_written.count(kind) for kind in KINDS}
    names = IMAGE_SOURCES[images][0]
    summary = {
        "output": os.path.abspath(output), "samples": samples, "noise": noise, "seed": seed,
        "shards": sum(job.directory == "shards" for job in jobs), "eval_samples": eval_samples,
        "images": images, "classes": len(IMAGE_SOURCES[images][0]), "image_size": image_size, "kinds": counts,
        "relabel": relabel, "relabel_pairs": [f"{names[a]} -> {names[b]}" for a, b, _ in plan],
        "seconds": round(time.time() - started, 2),
    }
    with open(os.path.join(output, "toy_pool.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _make_toy_pool_defaults() -> dict:
    import inspect

    return {name: p.default for name, p in inspect.signature(make_toy_pool).parameters.items()}


_MAKE_DEFAULTS = _make_toy_pool_defaults()


@dataclass
class ToyPoolConfig:
    """Arguments of :func:`make_toy_pool` as one config (defaults read from its signature)."""

    output: str  # local directory to write the pool into
    samples: int  # training samples in the pool
    noise: float = 0.3  # fraction of samples with a corrupted caption, in [0, 1]
    seed: int = _MAKE_DEFAULTS["seed"]
    shard_size: int = _MAKE_DEFAULTS["shard_size"]
    eval_samples: int = _MAKE_DEFAULTS["eval_samples"]
    image_size: int = _MAKE_DEFAULTS["image_size"]
    workers: int | None = _MAKE_DEFAULTS["workers"]  # processes writing shards; None = CPU count
    images: str = _MAKE_DEFAULTS["images"]  # one of IMAGE_SOURCES
    relabel: float = _MAKE_DEFAULTS["relabel"]  # fraction of the pool consistently relabelled (systematic noise), in [0, 1)
    relabel_pairs: int = _MAKE_DEFAULTS["relabel_pairs"]  # one-way class pairs the relabelling is spread over

    def __post_init__(self):
        if not self.output:
            raise ValueError("output is required")
        if self.images not in IMAGE_SOURCES:
            raise ValueError(f"images must be one of {list(IMAGE_SOURCES)}, got {self.images!r}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise is a fraction in [0, 1], got {self.noise}")
        if self.shard_size < 1 or self.image_size < 8 or self.eval_samples < 0:
            raise ValueError(f"need shard_size >= 1, image_size >= 8, eval_samples >= 0 "
                             f"(got {self.shard_size}, {self.image_size}, {self.eval_samples})")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0.0 <= self.relabel < 1.0 or self.relabel_pairs < 1:
            raise ValueError(f"relabel is a fraction in [0, 1) and relabel_pairs >= 1, got {self.relabel} and {self.relabel_pairs}")
        _relabel_plan(self.seed, self.images, self.relabel, self.relabel_pairs, self.noise)  # raises if a class is too small

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self) -> dict:
        """Write the pool (:func:`make_toy_pool`); return its summary."""
        return make_toy_pool(**self.to_dict())


def toy_score_table(uids: np.ndarray, noisy: np.ndarray, epochs: int = 2, batch: int = 50, seed: int = 0):
    """A score table (the Stage-1 contract's columns) for a toy pool's uids, without training: ``score`` separates the
    noisy samples with overlap, ``score_zero`` is noise. For exercising Stage 2 on a pool whose images exist."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    steps = len(uids) // batch
    rows = []
    for epoch in range(epochs):
        order = rng.permutation(len(uids))
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            score = np.where(noisy[idx], -1.0, 1.0) + 0.8 * rng.standard_normal(len(idx))
            rows.append(pd.DataFrame({"uid": uids[idx], "step": np.int64(epoch * steps + s), "epoch": np.int32(epoch), "rank": np.int32(0),
                                      "score": score.astype(np.float32), "weight": np.float32(1 / batch), "batch_size": np.int32(batch),
                                      "score_zero": rng.standard_normal(len(idx)).astype(np.float32)}))
    return pd.concat(rows, ignore_index=True)
