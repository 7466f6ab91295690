"""IDX reading and validation, batch decoding, and the download's source fallback and checksums."""

import gzip
import hashlib

import pytest

from parallel_nn import UserError
from parallel_nn.data import mnist
from tests.conftest import synthetic_split


def test_roundtrip_gz_and_raw(tmp_path):
    split = synthetic_split(20, 3)
    mnist.write_split(tmp_path, "train", split)
    mnist.write_split(tmp_path, "t10k", split)
    assert mnist.load_split(tmp_path, "train") == split
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # unzipped files work too
        (tmp_path / name).write_bytes(gzip.decompress((tmp_path / f"{name}.gz").read_bytes()))
        (tmp_path / f"{name}.gz").unlink()
    assert mnist.load_split(tmp_path, "t10k") == split


def test_decode_batch_keeps_bytes_until_needed():
    split = synthetic_split(5, 1)
    X = mnist.decode_batch(split.images, [3, 1])
    assert X.raw == split.images[3 * 784 : 4 * 784] + split.images[784 : 2 * 784]
    assert X.dense()[1] == [b / 255 for b in split.images[784 : 2 * 784]]


def corrupt(tmp_path, name, data):
    mnist.write_split(tmp_path, "train", synthetic_split(10, 0))
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))


@pytest.mark.parametrize("name, data, words", [
    ("train-images-idx3-ubyte", mnist.idx_bytes([10, 28, 28], bytes(10 * 784))[:-5], "truncated"),
    ("train-images-idx3-ubyte", b"\x00\x00\x08\x01" + bytes(100), "magic number"),
    ("train-images-idx3-ubyte", b"\x00\x00", "too short"),
    ("train-labels-idx1-ubyte", mnist.idx_bytes([9], bytes(9)), "10 images but"),
    ("train-labels-idx1-ubyte", mnist.idx_bytes([10], bytes([3] * 9 + [10])), "label 10"),
    ("train-images-idx3-ubyte", mnist.idx_bytes([10, 20, 20], bytes(10 * 400)), "20x20"),
])
def test_bad_files_are_named_with_what_is_wrong(tmp_path, name, data, words):
    corrupt(tmp_path, name, data)
    with pytest.raises(UserError) as error:
        mnist.load_split(tmp_path, "train")
    assert words in str(error.value) and (name in str(error.value) or "train-" in str(error.value))


def test_not_gzip_and_missing_files(tmp_path):
    mnist.write_split(tmp_path, "train", synthetic_split(10, 0))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz: cannot read"):
        mnist.load_split(tmp_path, "train")
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte.gz is missing; run `make datasets`"):
        mnist.load_split(tmp_path, "t10k")


@pytest.fixture
def fake_sums(monkeypatch):
    """Pretend the four 'real' files are tiny ones, so download can be tested without a network."""
    contents = {name: name.encode() * 3 for name in mnist.SHA256}
    monkeypatch.setattr(mnist, "SHA256", {n: hashlib.sha256(c).hexdigest() for n, c in contents.items()})
    return contents


def test_download_falls_back_and_then_finds_files_present(tmp_path, fake_sums):
    calls, lines = [], []

    def offline(name, workdir):
        calls.append("mirror")
        raise OSError("Name or service not known")

    def wrong(name, workdir):
        calls.append("wrong")
        return b"something else"

    def good(name, workdir):
        calls.append("good")
        return fake_sums[name]

    mnist.download(tmp_path, lines.append, [("a", offline), ("b", wrong), ("c", good)])
    assert calls == ["mirror", "wrong", "good", "good", "good", "good"]
    assert any("a failed: Name or service not known" in line for line in lines)
    assert any("b failed" in line and "SHA-256" in line for line in lines)
    for name, content in fake_sums.items():
        assert gzip.decompress((tmp_path / f"{name}.gz").read_bytes()) == content
    calls.clear()
    mnist.download(tmp_path, lines.append, [("c", good)])
    assert calls == [] and "present and verified" in lines[-1]


def test_download_every_source_fails(tmp_path, fake_sums):
    def offline(name, workdir):
        raise OSError("unreachable")

    with pytest.raises(UserError, match="Download them by hand from https://ossci-datasets"):
        mnist.download(tmp_path, lambda line: None, [("a", offline)])
    assert list(tmp_path.iterdir()) == []


def test_shift_image_is_a_translation():
    side = 28
    image = bytes((r * side + c) % 251 + 1 for r in range(side) for c in range(side))
    for dx, dy in [(0, 0), (2, 0), (-1, 0), (0, 3), (0, -2), (1, -1), (-2, 2)]:
        out = mnist.shift_image(image, dx, dy)
        expected = bytes(image[(r - dy) * side + (c - dx)] if 0 <= r - dy < side and 0 <= c - dx < side else 0
                         for r in range(side) for c in range(side))
        assert out == expected, (dx, dy)
    augment = mnist.random_augment(3, 2, 0, "seed")
    assert len(augment) == 9 and all(126 <= b <= 130 for b in augment) and augment == mnist.random_augment(3, 2, 0, "seed")
    assert augment[2::3] == bytes([128] * 3)  # no rotation
    X = mnist.decode_batch(image + image, [1, 0], augment=bytes([129, 128, 128, 128, 128, 128]))
    assert X.raw == mnist.shift_image(image, 1, 0) + image


def test_rotate_image_turns_about_the_centre():
    side = 28
    image = bytes((r * side + c) % 251 + 1 for r in range(side) for c in range(side))
    assert mnist.rotate_image(image, 0) == image
    # a quarter turn counter-clockwise maps the grid onto itself: out[r][c] = in[c][side - 1 - r]
    assert mnist.rotate_image(image, 90) == bytes(image[c * side + side - 1 - r] for r in range(side) for c in range(side))
    dot = bytearray(side * side)
    dot[13 * side + 22] = 255  # right of the centre; a small turn counter-clockwise lifts it
    turned = mnist.rotate_image(bytes(dot), 10)
    lit = [i for i, v in enumerate(turned) if v]  # nearest-pixel sampling may copy a pixel twice
    assert lit and all(i // side < 13 and i % side >= 20 for i in lit)
    blank_corners = mnist.rotate_image(bytes([255] * side * side), 30)
    assert blank_corners[0] == 0 and blank_corners[side * side // 2 + side // 2] == 255  # outside is zero
    augment = mnist.random_augment(200, 1, 10, "seed")
    assert augment[0::3] + augment[1::3] == mnist.random_augment(200, 1, 0, "seed")[0::3] + mnist.random_augment(200, 1, 0, "seed")[1::3]
    assert min(augment[2::3]) == 118 and max(augment[2::3]) == 138  # angles in [-10, 10], both ends drawn
    X = mnist.decode_batch(image, [0], augment=bytes([129, 128, 133]))
    assert X.raw == mnist.rotate_image(mnist.shift_image(image, 1, 0), 5)


# ---- corrupt, truncated and oversized files ----


def garble(path, start=20, stop=60):
    """Overwrite bytes start..stop of a file, as a disk or a bad download might."""
    data = bytearray(path.read_bytes())
    data[start:stop] = b"\xff" * (stop - start)
    path.write_bytes(bytes(data))


def test_corrupt_gzip_is_one_line_naming_the_file(tmp_path):
    mnist.write_split(tmp_path, "t10k", synthetic_split(300, 1))
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    garble(path)
    with pytest.raises(UserError) as error:
        mnist.load_split(tmp_path, "t10k")
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "corrupt gzip data" in message and "\n" not in message
    assert "delete it and run `make datasets`" in message
    mnist.write_split(tmp_path, "t10k", synthetic_split(300, 1))
    path.write_bytes(path.read_bytes()[:-12])  # cut short, as an interrupted download would
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte.gz: cannot read it: truncated gzip data .*; delete it and run"):
        mnist.load_split(tmp_path, "t10k")


def fetch_from(contents, calls):
    def fetch(name, workdir):
        calls.append(name)
        return contents[name]
    return fetch


@pytest.mark.parametrize("damage", ["garbled", "truncated", "wrong content", "not gzip"])
def test_download_refetches_a_bad_gz(tmp_path, fake_sums, damage):
    calls, lines = [], []
    mnist.download(tmp_path, lines.append, [("good", fetch_from(fake_sums, calls))])
    name = "t10k-labels-idx1-ubyte"
    path = tmp_path / f"{name}.gz"
    if damage == "garbled":
        garble(path, 12, 30)  # inside the deflate stream: "Error -3 while decompressing data"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-12])
    elif damage == "wrong content":
        path.write_bytes(gzip.compress(b"something else"))
    else:
        path.write_bytes(b"not gzip at all")
    calls.clear()
    mnist.download(tmp_path, lines.append, [("good", fetch_from(fake_sums, calls))])
    assert calls == [name]
    assert gzip.decompress(path.read_bytes()) == fake_sums[name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.gz" for n in fake_sums)  # no temporary left


def test_download_with_both_gz_and_unzipped_files(tmp_path, fake_sums):
    calls, lines = [], []
    fetch = fetch_from(fake_sums, calls)
    mnist.download(tmp_path, lines.append, [("good", fetch)])
    # a bad .gz next to a good unzipped copy: the .gz (which the loader prefers) is rebuilt from it, no fetch
    name = "train-images-idx3-ubyte"
    garble(tmp_path / f"{name}.gz", 10, 30)
    (tmp_path / name).write_bytes(fake_sums[name])
    calls.clear()
    mnist.download(tmp_path, lines.append, [("good", fetch)])
    assert calls == [] and gzip.decompress((tmp_path / f"{name}.gz").read_bytes()) == fake_sums[name]
    # a bad unzipped file alone is fetched again, as .gz, which the loader then reads instead
    name = "train-labels-idx1-ubyte"
    (tmp_path / f"{name}.gz").unlink()
    (tmp_path / name).write_bytes(b"junk")
    mnist.download(tmp_path, lines.append, [("good", fetch)])
    assert calls == [name] and gzip.decompress((tmp_path / f"{name}.gz").read_bytes()) == fake_sums[name]
    calls.clear()
    mnist.download(tmp_path, lines.append, [("good", fetch)])
    assert calls == [] and "present and verified" in lines[-1]


BOMB_PROBE = """
import resource, sys
from parallel_nn import UserError
from parallel_nn.data import mnist
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    mnist.load_split(sys.argv[1], "train")
except UserError as e:
    print(str(e))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("zipped", [True, False])
def test_oversized_file_is_refused_without_reading_it_whole(tmp_path, zipped):
    """A file holding far more than its header declares (a gzip bomb, or junk after the images) is
    refused after reading at most what the header declares, so memory stays small."""
    import subprocess
    import sys
    import zlib
    from pathlib import Path

    mnist.write_split(tmp_path, "train", synthetic_split(100, 0))
    head = mnist.idx_bytes([100, 28, 28], bytes(100 * 784))
    extra = 200 << 20
    path = tmp_path / "train-images-idx3-ubyte"
    if zipped:
        def member(data):
            z = zlib.compressobj(9, zlib.DEFLATED, 31)
            return z.compress(data) + z.flush()
        zeros = member(bytes(8 << 20))  # 8 MiB of zeros in ~8 kB; gzip members may be concatenated
        path = path.with_suffix(".gz")
        path.write_bytes(member(head) + zeros * (extra // (8 << 20)))
        assert path.stat().st_size < 1 << 20
    else:
        (tmp_path / "train-images-idx3-ubyte.gz").unlink()
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(len(head) + extra)  # sparse: cheap to make
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(tmp_path)], capture_output=True, text=True,
                         cwd=root, timeout=120)
    message, grown_mb = out.stdout.strip().splitlines()
    assert int(grown_mb) < 40, out  # it was ~390 MB when the whole file was read before checking
    assert message.startswith(f"{path}: ") and "more bytes than its header declares" in message, out
    assert "\n" not in message and mnist.FIX in message


@pytest.mark.parametrize("prefix, name, data, words", [
    ("train", "train-images-idx3-ubyte", mnist.idx_bytes([0, 28, 28], b""), "no images"),
    ("train", "train-labels-idx1-ubyte", mnist.idx_bytes([0], b""), "0 labels"),
    ("t10k", "t10k-images-idx3-ubyte", mnist.idx_bytes([0, 28, 28], b""), "no images"),
    ("train", "train-images-idx3-ubyte", mnist.idx_bytes([10, 1, 784], bytes(10 * 784)), "1x784"),
    ("train", "train-images-idx3-ubyte", mnist.idx_bytes([10, 784, 1], bytes(10 * 784)), "784x1"),
    ("train", "train-images-idx3-ubyte", mnist.idx_bytes([10 ** 7, 28, 28], bytes(100)), "10000000 images"),
    ("train", "train-labels-idx1-ubyte", mnist.idx_bytes([10 ** 9], bytes(100)), "1000000000 labels"),
], ids=["empty-train", "empty-train-labels", "empty-test", "1x784", "784x1", "huge-count", "huge-label-count"])
def test_empty_wrong_shape_and_implausible_headers(tmp_path, prefix, name, data, words):
    mnist.write_split(tmp_path, prefix, synthetic_split(10, 0))
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
    with pytest.raises(UserError) as error:
        mnist.load_split(tmp_path, prefix)
    message = str(error.value)
    assert words in message and f"{name}.gz" in message and "\n" not in message, message
    assert mnist.FIX in message, message


def reference_augment(count, shift, rotate, seed):
    """random_augment as first written, with randint: the definition the fast one must match."""
    import random

    moves, turns = random.Random(seed), random.Random(seed + "/rotate")
    out = bytearray()
    for _ in range(count):
        out += bytes((moves.randint(-shift, shift) + 128, moves.randint(-shift, shift) + 128,
                      (turns.randint(-rotate, rotate) if rotate else 0) + 128))
    return bytes(out)


@pytest.mark.parametrize("shift, rotate", [(1, 0), (0, 10), (1, 10), (4, 30), (2, 1), (3, 0)])
def test_random_augment_draws_what_randint_draws(shift, rotate):
    for seed in ("parallel_nn/shift/0/0/0", "parallel_nn/shift/7/3/119"):
        assert mnist.random_augment(500, shift, rotate, seed) == reference_augment(500, shift, rotate, seed)


@pytest.mark.parametrize("low, width", [(127, 3), (124, 9), (98, 61), (1, 2), (1, 128), (1, 129), (1, 255), (0, 5), (100, 300)])
def test_uniform_bytes_are_randranges_draws(low, width):
    """The draw (CPython's table and bytes; PyPy's loop), against randrange, at every table size (and
    the loop where a table cannot hold the values)."""
    import random

    for seed, count in (("a", 0), ("a", 1), ("parallel_nn/shift/0/0/0", 1000), ("b", 5000)):
        draw = random.Random(seed).randrange
        assert mnist.uniform_bytes(seed, low, width, count) == bytes((low + draw(width)) % 256 for _ in range(count))


def test_seeded_is_random_random_of_the_string():
    import random

    for seed in ("", "parallel_nn/shift/0/1/5", "é€𝄞" * 40):
        a, b = mnist.seeded(seed), random.Random(seed)
        assert [a.getrandbits(32) for _ in range(700)] == [b.getrandbits(32) for _ in range(700)]
