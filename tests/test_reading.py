"""The shard reader parses tar headers itself (tarfile's parsing was as slow as decoding a PNG):
it reads what tarfile writes in every format as webdataset does, and fails on damage."""

import io
import tarfile

import pytest
import webdataset as wds

from pathgan.shards.reading import TarFormatError, index_shard, tar_samples

LONG = "slide-" + "x" * 120  # a key longer than a ustar name field (100 bytes)


def write_tar(path, tar_format, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tar_format) as tar:
        directory = tarfile.TarInfo("folder")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0.5  # a float: pax headers, as pathgan's own shards have
            tar.addfile(info, io.BytesIO(data))


MEMBERS = [("a1.png", b"image a1"), ("a1.json", b"{}"), ("folder/b2.PNG", b"image b2" * 300),
           ("folder/b2.json", b'{"label": 1}'), ("__meta__.txt", b"not a sample"),
           (f"{LONG}.png", b"long image"), (f"{LONG}.json", b"[]")]


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                        tarfile.PAX_FORMAT])
def test_samples_are_read_as_webdataset_reads_them(tmp_path, tar_format):
    path = tmp_path / "shard.tar"
    members = MEMBERS if tar_format != tarfile.USTAR_FORMAT else \
        [m for m in MEMBERS if LONG not in m[0]]  # ustar cannot hold the long names
    write_tar(path, tar_format, members)
    ours = [{k: v for k, v in s.items() if k != "__url__"} for s in tar_samples(path)]
    theirs = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
              for s in wds.DataPipeline(wds.SimpleShardList([str(path)]),
                                        wds.tarfile_to_samples())]
    assert ours == theirs
    assert ours[1]["png"] == b"image b2" * 300  # the extension is lower-cased, as webdataset's
    index = dict(index_shard(path))
    offset, size = index["folder/b2"]["png"]
    assert path.read_bytes()[offset:offset + size] == b"image b2" * 300


def test_a_truncated_shard_gives_the_samples_before_the_damage_then_fails(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tarfile.PAX_FORMAT, MEMBERS)
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    read = []
    with pytest.raises(TarFormatError):
        for sample in tar_samples(path):
            read.append(sample["__key__"])
    assert read[:1] == ["a1"]


def test_a_file_that_is_not_a_tar_fails(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"not a tar file " * 100)
    with pytest.raises(TarFormatError, match="damaged tar header"):
        list(tar_samples(path))
