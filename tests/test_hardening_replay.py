"""``encapfwd replay`` / ``explain`` on damaged inputs and unwritable outputs: never a traceback.

- A capture cut short (last pcap record or record header, a record whose length runs past the end of the
  file, a pcapng block) is replayed up to its last whole frame, OUT is written, one warning line names the
  frame and byte offset, ``--json`` says ``"truncated": true``, and the exit status is 3.
- Everything else wrong (not a capture, empty, a directory, missing, corrupt blocks, OUT not writable, a
  full disk) is one ``encapfwd: error: …`` line and a non-zero status.
- The reader raises nothing but :class:`CaptureError` for any bytes (random and mutated files).

scapy writes the well-formed captures and is the oracle for what they hold; malformed bytes are built with
``struct``; tshark is the independent check of where a truncated file ends.
"""

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encapfwd.replay.capture import CaptureError, CaptureReader, PcapWriter, read_frames
from encapfwd.errors import EncapfwdError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE = ROOT / "examples" / "sample.pcap"
CONFIG = ROOT / "examples" / "encapfwd.toml"
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (Debian package tshark)")
EXIT_TRUNCATED = 3


def encapfwd(*args, cwd=None, user=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
    cmd = [str(BIN / "encapfwd"), *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False, timeout=120)


def assert_one_line_error(proc, *words, status=None):
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    if status is not None:
        assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("encapfwd: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def sample_frames():
    from scapy.utils import RawPcapReader  # the oracle: what the sample holds

    return [(meta.sec + meta.usec / 1e6, bytes(data)) for data, meta in RawPcapReader(str(SAMPLE))]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The sample replayed whole: its OUT bytes and JSON summary."""
    out = tmp_path_factory.mktemp("whole") / "out.pcap"
    proc = encapfwd("--config", str(CONFIG), "replay", str(SAMPLE), str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes(), json.loads(proc.stdout)


@pytest.fixture(scope="module")
def sample_pcapng(tmp_path_factory):
    """The sample as pcapng, written by scapy, and the byte offset of each of its blocks."""
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapNgWriter

    path = tmp_path_factory.mktemp("ng") / "sample.pcapng"
    writer = PcapNgWriter(str(path))
    for ts, data in sample_frames():
        pkt = Ether(data)
        pkt.time = ts
        writer.write(pkt)
    writer.close()
    blob = path.read_bytes()
    offsets, pos = [], 0
    while pos < len(blob):
        offsets.append(pos)
        pos += struct.unpack_from("<I", blob, pos + 4)[0]
    assert pos == len(blob)
    return path, offsets


def tshark_count(path):
    """Frames tshark reads from *path*, and its stderr (it says when a file is cut short)."""
    proc = subprocess.run([TSHARK, "-r", str(path), "-T", "fields", "-e", "frame.number"],
                          capture_output=True, text=True, timeout=120, check=False)
    return len(proc.stdout.split()), proc.stderr


# ------------------------------------------------------------------------------------ truncated captures


def _cut_pcap(kind):
    blob = SAMPLE.read_bytes()
    if kind == "record":  # the header announces 100 bytes, the file ends after 40 of them
        return blob + struct.pack("<IIII", 1, 0, 100, 100) + bytes(40), len(blob), 16 + 40, 116
    if kind == "record-past-eof":  # a record length far past the end of the file
        return blob + struct.pack("<IIII", 1, 0, 60000, 60000) + bytes(10), len(blob), 26, 60016
    assert kind == "record-header"  # the file ends inside a record header
    return blob + struct.pack("<IIII", 1, 0, 100, 100)[:7], len(blob), 7, 16


def _replay_cut(src, data: bytes):
    """Replay the truncated capture *data* (written to *src*): exit status 3 and ``truncated`` in the JSON
    summary; the process and the summary."""
    src.write_bytes(data)
    proc = encapfwd("--config", str(CONFIG), "replay", str(src), str(src.with_name("out.pcap")), "--json")
    assert proc.returncode == EXIT_TRUNCATED, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["truncated"] is True
    return proc, summary


@pytest.mark.parametrize("kind", ["record", "record-past-eof", "record-header"])
def test_truncated_pcap_is_replayed_and_reported(tmp_path, whole, kind):
    blob, offset, have, need = _cut_pcap(kind)
    proc, summary = _replay_cut(tmp_path / "cut.pcap", blob)
    assert summary["frames_in"] == 273 and summary["forwarded"] + summary["dropped"] == 273
    cut = summary["truncation"]
    assert (cut["frame"], cut["offset"], cut["have"], cut["need"]) == (274, offset, have, need), cut
    assert (tmp_path / "out.pcap").read_bytes() == whole[0]  # everything before the cut was forwarded and written
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("encapfwd: warning: ")
    assert "cut short in the middle of frame 274" in lines[0] and f"byte offset {offset}" in lines[0], lines
    assert "replayed the 273 frames" in lines[0]


def test_whole_capture_is_not_truncated(whole):
    assert whole[1]["truncated"] is False and whole[1]["truncation"] is None


def test_truncated_pcap_text_summary_and_tshark_agree(tmp_path):
    blob, offset, _, _ = _cut_pcap("record")
    src = tmp_path / "cut.pcap"
    src.write_bytes(blob)
    proc = encapfwd("--config", str(CONFIG), "replay", str(src), str(tmp_path / "o.pcap"))
    assert proc.returncode == EXIT_TRUNCATED, proc.stderr
    assert "replayed 273 frames" in proc.stdout and "ttl-exceeded" in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and f"byte offset {offset}" in proc.stderr
    if TSHARK:
        count, err = tshark_count(src)
        assert count == 273 and "cut short in the middle of a packet" in err, err


def test_truncated_exit_status_in_process_with_progress_bar(tmp_path):
    from click.testing import CliRunner

    from encapfwd.cli.replay import EXIT_TRUNCATED as exit_truncated
    from encapfwd.cli.replay import replay_command

    assert exit_truncated == EXIT_TRUNCATED
    src = tmp_path / "cut.pcap"
    src.write_bytes(_cut_pcap("record")[0])
    result = CliRunner().invoke(replay_command, [str(src), str(tmp_path / "o.pcap"), "--progress", "--json"],
                                obj={"config_path": str(CONFIG)})
    assert result.exit_code == EXIT_TRUNCATED, result.output
    assert json.loads(result.stdout)["truncated"] is True
    assert "replaying" in result.stderr and "cut short in the middle of frame 274" in result.stderr


def test_truncated_first_record_writes_an_empty_capture(tmp_path):
    src = tmp_path / "cut.pcap"
    src.write_bytes(SAMPLE.read_bytes()[:24] + struct.pack("<IIII", 1, 0, 100, 100) + bytes(40))
    out = tmp_path / "o.pcap"
    proc = encapfwd("--config", str(CONFIG), "replay", str(src), str(out), "--json")
    assert proc.returncode == EXIT_TRUNCATED, proc.stderr
    assert json.loads(proc.stdout)["frames_in"] == 0
    assert "frame 1 (record at byte offset 24: 56 of 116 bytes present)" in proc.stderr
    assert len(out.read_bytes()) == 24  # a valid, empty pcap


@pytest.mark.parametrize("cut", ["last-epb", "block-header", "idb-only"])
def test_truncated_pcapng_is_replayed_and_reported(tmp_path, sample_pcapng, whole, cut):
    path, offsets = sample_pcapng
    blob = path.read_bytes()
    if cut == "last-epb":  # the last enhanced packet block loses its last 10 bytes
        data, frames, offset, words = blob[:-10], 272, offsets[-1], ["frame 273", "enhanced packet block"]
    elif cut == "block-header":  # 5 bytes of a next block header
        data, frames, offset = blob + blob[offsets[-1]:offsets[-1] + 5], 273, len(blob)
        words = ["block header", "after frame 273"]
    else:  # the section header and half of the interface description block
        data, frames, offset = blob[:offsets[1] + 10], 0, offsets[1]
        words = ["interface description block", "before the first frame"]
    proc, summary = _replay_cut(tmp_path / "cut.pcapng", data)
    assert summary["frames_in"] == frames
    assert summary["truncation"]["offset"] == offset
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"byte offset {offset}" in lines[0], proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    if cut == "block-header":
        assert (tmp_path / "out.pcap").read_bytes() == whole[0]
    if TSHARK and cut != "block-header":
        count, err = tshark_count(tmp_path / "cut.pcapng")
        assert count == frames and "cut short" in err, (count, err)


def test_explain_on_a_truncated_capture(tmp_path):
    blob, offset, _, _ = _cut_pcap("record")
    src = tmp_path / "cut.pcap"
    src.write_bytes(blob)
    proc = encapfwd("--config", str(CONFIG), "explain", str(src), "--index", "273")
    line = assert_one_line_error(proc, "no frame 273", "273 whole frames", "frame 274",
                                 f"byte offset {offset}", status=EXIT_TRUNCATED)
    assert "cut short" in line
    ok = encapfwd("--config", str(CONFIG), "explain", str(src), "--index", "272")
    assert ok.returncode == 0 and "=> " in ok.stdout, ok.stderr
    past = encapfwd("--config", str(CONFIG), "explain", str(SAMPLE), "--index", "273")
    assert_one_line_error(past, "has 273 frames", status=1)


# ----------------------------------------------------------------------------------- one-line errors


def test_full_disk_is_one_line(tmp_path):
    proc = encapfwd("--config", str(CONFIG), "replay", str(SAMPLE), "/dev/full")
    line = assert_one_line_error(proc, status=1)
    assert line == "encapfwd: error: cannot write /dev/full: No space left on device"


def test_writer_on_a_full_disk_fails_on_write_and_on_close():
    writer = PcapWriter("/dev/full")
    with pytest.raises(CaptureError, match="cannot write /dev/full: No space left on device"):
        with writer:
            for _ in range(2000):  # more than the 1 MiB buffer: the error comes from write()
                writer.write(1.0, bytes(1000))
    assert writer._handle.closed
    with pytest.raises(CaptureError, match="No space left on device"):
        with PcapWriter("/dev/full") as small:  # everything fits the buffer: the error comes from close()
            small.write(1.0, bytes(60))


def _pcapng(*blocks):
    shb = struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 28)
    return shb + b"".join(blocks)


def _block(btype, body):
    body += bytes(-len(body) % 4)
    return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def _epb(frame, ifid=0, caplen=None):
    return _block(6, struct.pack("<IIIII", ifid, 0, 1000000, len(frame) if caplen is None else caplen,
                                 len(frame)) + frame)


ETHER = bytes.fromhex("020000000001020000000002") + b"\x08\x06" + bytes(28)
IDB = _block(1, struct.pack("<HHI", 1, 0, 65535))


@pytest.mark.parametrize("command", ["replay", "explain"])
def test_empty_interface_description_block_is_one_line(tmp_path, command):
    src = tmp_path / "emptyidb.pcapng"
    src.write_bytes(_pcapng(_block(1, b""), _epb(ETHER)))
    args = [str(src), str(tmp_path / "o.pcap")] if command == "replay" else [str(src)]
    proc = encapfwd("--config", str(CONFIG), command, *args)
    assert_one_line_error(proc, "interface description block", "byte offset 28", status=1)


@pytest.mark.parametrize("name, data, words", [
    ("bad-magic.pcap", b"\x00\x01\x02\x03" + bytes(40), ["not a pcap or pcapng capture", "00 01 02 03"]),
    ("empty.pcap", b"", ["empty file"]),
    ("short-header.pcap", SAMPLE.read_bytes()[:10], ["pcap file header is cut short"]),
    ("short-shb.pcapng", _pcapng()[:20], ["section header block is cut short"]),
    ("bad-bom.pcapng", _pcapng()[:8] + b"abcd" + _pcapng()[12:], ["section header block", "byte-order"]),
    ("huge-record.pcap", SAMPLE.read_bytes()[:24] + struct.pack("<IIII", 0, 0, 0xFFFFFFF0, 60),
     ["corrupt record header of frame 1", "byte offset 24"]),
    ("epb-caplen.pcapng", _pcapng(IDB, _epb(ETHER, caplen=500)), ["enhanced packet block", "byte offset 48"]),
    ("short-epb.pcapng", _pcapng(IDB, _block(6, bytes(8))), ["enhanced packet block", "byte offset 48"]),
    ("lengths-differ.pcapng", _pcapng(IDB, _epb(ETHER)[:-4] + b"\xff\x00\x00\x00"),
     ["enhanced packet block", "two block lengths differ"]),
    ("odd-length.pcapng", _pcapng(IDB, struct.pack("<II", 6, 13) + bytes(20)), ["block length 13"]),
    ("wifi.pcapng", _pcapng(_block(1, struct.pack("<HHI", 105, 0, 65535))), ["link type 105"]),
])
def test_bad_inputs_are_one_line(tmp_path, name, data, words):
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / "out.pcap"
    out.write_bytes(b"keep me")
    proc = encapfwd("--config", str(CONFIG), "replay", str(src), str(out))
    assert_one_line_error(proc, *words, status=1)
    if name in ("bad-magic.pcap", "empty.pcap", "short-header.pcap", "short-shb.pcapng", "bad-bom.pcapng"):
        assert out.read_bytes() == b"keep me"  # a bad file header is refused before OUT is touched
    explain = encapfwd("--config", str(CONFIG), "explain", str(src))
    assert_one_line_error(explain, *words, status=1)


def test_in_is_a_directory_missing_or_not_a_file(tmp_path):
    cases = ((tmp_path, ["is a directory"]), (tmp_path / "nope.pcap", ["nope.pcap", "no such file"]),
             (Path("/dev/null"), ["not a regular file"]))
    for infile, words in cases:
        out = str(tmp_path / "o.pcap")
        assert_one_line_error(encapfwd("--config", str(CONFIG), "replay", str(infile), out), *words)
        assert_one_line_error(encapfwd("--config", str(CONFIG), "explain", str(infile)), *words)


def test_out_cannot_be_written(tmp_path):
    missing = str(tmp_path / "no" / "o.pcap")
    assert_one_line_error(encapfwd("--config", str(CONFIG), "replay", str(SAMPLE), missing),
                          "cannot write", "No such file or directory", status=1)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(encapfwd("--config", str(CONFIG), "replay", str(SAMPLE), str(afile / "o.pcap")),
                          "cannot write", "Not a directory", status=1)
    assert_one_line_error(encapfwd("--config", str(CONFIG), "replay", str(SAMPLE), str(tmp_path)),
                          "is a directory")


def test_out_folder_without_write_permission():
    user = None
    if os.geteuid() == 0:  # root writes anywhere: run the command as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        user = 65534
    top = Path(tempfile.mkdtemp(prefix="encapfwd-ro-"))
    try:
        top.chmod(0o755)
        for src in (SAMPLE, CONFIG):
            shutil.copy(src, top / src.name)
            (top / src.name).chmod(0o644)
        readonly = top / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        proc = encapfwd("--config", str(top / CONFIG.name), "replay", str(top / SAMPLE.name),
                        str(readonly / "o.pcap"), cwd=str(top), user=user)
        assert_one_line_error(proc, f"cannot write {readonly / 'o.pcap'}: Permission denied", status=1)
    finally:
        shutil.rmtree(top)


# ------------------------------------------------------------------------------ the reader, fuzzed


def _handmade_pcapng():
    """Big-endian pcapng: if_tsresol, raw IP, obsolete and simple packet blocks, then a second section."""

    def be_block(btype, body):
        body += bytes(-len(body) % 4)
        return struct.pack(">II", btype, len(body) + 12) + body + struct.pack(">I", len(body) + 12)

    shb = struct.pack(">IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack(">I", 28)
    idb = be_block(1, struct.pack(">HHI", 1, 0, 65535) + struct.pack(">HHB3x", 9, 1, 9) + bytes(4))
    raw = be_block(1, struct.pack(">HHI", 101, 0, 65535))
    frames = [ETHER, ETHER[:30], bytes.fromhex("4500001c00010000401100000a0000010a090909") + bytes(8)]
    blocks = [shb, idb, raw,
              be_block(6, struct.pack(">IIIII", 0, 0, 5, len(frames[0]), len(frames[0])) + frames[0]),
              be_block(2, struct.pack(">HHIIII", 0, 0, 0, 7, len(frames[1]), 99) + frames[1]),
              be_block(6, struct.pack(">IIIII", 1, 0, 9, len(frames[2]), len(frames[2])) + frames[2]),
              be_block(3, struct.pack(">I", len(frames[0])) + frames[0]),
              be_block(5, bytes(12)),
              _pcapng(IDB, _epb(ETHER))]
    return b"".join(blocks)


def _outcome(path):
    """``("frames", [...], truncation)`` or ``("error", message)``; anything else fails the test."""
    try:
        with CaptureReader(path) as reader:
            frames = list(reader)
        return "frames", frames, reader.truncation
    except EncapfwdError as exc:  # what cli.main turns into one line
        assert type(exc) is CaptureError, type(exc)
        message = str(exc)
        assert message and "\n" not in message
        return "error", message


def test_handmade_pcapng_reads_like_scapy(tmp_path):
    from scapy.utils import RawPcapNgReader

    src = tmp_path / "hand.pcapng"
    src.write_bytes(_handmade_pcapng())
    kind, frames, truncation = _outcome(src)
    assert kind == "frames" and truncation is None
    oracle = [bytes(data) for data, _meta in RawPcapNgReader(str(src))]
    assert len(frames) == len(oracle) == 5
    assert [f for _, f in frames[:2] + frames[3:]] == oracle[:2] + oracle[3:]
    assert frames[2][1][12:14] == b"\x08\x00" and frames[2][1][14:] == oracle[2]  # raw IP: Ethernet added
    assert [ts for ts, _ in frames] == pytest.approx([5e-9, 7e-9, 9e-6, 0.0, 1.0])  # if_tsresol per interface
    if TSHARK:
        proc = subprocess.run([TSHARK, "-r", str(src), "-T", "fields", "-e", "frame.len"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.stdout.split() == ["42", "99", "28", "42", "42"], proc.stdout  # wire lengths


def test_reader_never_raises_anything_but_capture_error(tmp_path, sample_pcapng):
    rnd = random.Random(20240611)
    pcap = SAMPLE.read_bytes()
    first = sample_frames()[:20]
    small_pcap = pcap[:24 + sum(16 + len(f) for _, f in first)]
    ng_path, ng_offsets = sample_pcapng
    small_ng = ng_path.read_bytes()[:ng_offsets[22]]
    nano_be = struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1) + b"".join(
        struct.pack(">IIII", 1, 999999999, len(f), len(f)) + f for _, f in first[:5])
    bases = [small_pcap, small_ng, _handmade_pcapng(), nano_be, _pcapng(IDB, _epb(ETHER))]
    # unmodified bases: whole, and the same frames as scapy reads
    whole = {}
    for i, base in enumerate(bases):
        path = tmp_path / f"base{i}"
        path.write_bytes(base)
        kind, frames, truncation = _outcome(path)
        assert kind == "frames" and truncation is None, (i, kind)
        whole[i] = [f for _, f in frames]
    assert whole[0] == [f for _, f in first]
    assert whole[1] == [f for _, f in sample_frames()[:20]]
    # where a pcap record / pcapng block ends: a file cut there is whole, cut anywhere else it is truncated
    ends = {0: {24}, 1: set()}
    for ts, f in first:
        ends[0].add(max(ends[0]) + 16 + len(f))
    pos = 0
    while pos < len(small_ng):
        pos += struct.unpack_from("<I", small_ng, pos + 4)[0]
        ends[1].add(pos)
    outcomes = {"frames": 0, "error": 0, "truncated": 0}
    for n in range(2000):
        i = rnd.randrange(len(bases))
        data = bytearray(bases[i])
        op = n % 5
        if op == 0:  # cut anywhere: the frames are a prefix of the whole file's
            data = data[:rnd.randrange(len(data) + 1)]
        elif op == 1:  # flip a few bytes, anywhere (headers, lengths, options)
            for _ in range(rnd.randint(1, 6)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif op == 2:  # corrupt a length-looking 32-bit word
            at = rnd.randrange(0, len(data) - 4, 4)
            data[at:at + 4] = struct.pack("<I", rnd.choice([0, 1, 12, 13, 0xFFFF, 0xFFFFFFFF,
                                                             rnd.getrandbits(32), rnd.randrange(4096)]))
        elif op == 3:  # a valid magic followed by random bytes
            magic = rnd.choice([b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1",
                                b"\xa1\xb2\x3c\x4d",
                                b"\x0a\x0d\x0d\x0a" + struct.pack("<I", 28) + b"\x4d\x3c\x2b\x1a"])
            data = bytearray(magic + rnd.randbytes(rnd.randrange(200)))
        else:  # splice: insert or delete a run of bytes
            at = rnd.randrange(len(data))
            if rnd.random() < 0.5:
                del data[at:at + rnd.randint(1, 64)]
            else:
                data[at:at] = rnd.randbytes(rnd.randint(1, 64))
        path = tmp_path / f"fuzz{n % 50}"
        path.write_bytes(bytes(data))
        result = _outcome(path)
        if result[0] == "frames":
            outcomes["frames"] += 1
            outcomes["truncated"] += result[2] is not None
            if op == 0:
                got = [f for _, f in result[1]]
                assert got == whole[i][:len(got)], (i, len(data))
                if i in ends:
                    assert (result[2] is None) == (len(data) in ends[i]), (i, len(data), result[2])
        else:
            outcomes["error"] += 1
    assert outcomes["frames"] > 500 and outcomes["error"] > 100 and outcomes["truncated"] > 300, outcomes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(magic=st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1", b"\x0a\x0d\x0d\x0a", b"",
                              SAMPLE.read_bytes()[:24], _pcapng(), _pcapng() + struct.pack("<I", 1),
                              _pcapng() + struct.pack("<I", 6), _pcapng(IDB)]),
       tail=st.binary(max_size=400))
def test_reader_on_arbitrary_bytes(tmp_path, magic, tail):
    path = tmp_path / "h.bin"
    path.write_bytes(magic + tail)
    result = _outcome(path)
    try:
        frames = list(read_frames(path))  # the plain generator: same frames, stops quietly at a cut
    except CaptureError:
        assert result[0] == "error"
    else:
        assert result[0] == "frames" and frames == result[1]


# --------------------------------------------------------------------------------------- start-up


def test_help_and_replay_do_not_import_scapy(tmp_path):
    code = (
        "import sys\n"
        "from encapfwd.cli import main\n"
        "assert main(['--help']) == 0\n"
        "assert 'scapy' not in sys.modules\n"
        f"rc = main(['--config', {str(CONFIG)!r}, 'replay', {str(SAMPLE)!r}, {str(tmp_path / 'o.pcap')!r}])\n"
        "assert rc == 0, rc\n"
        "sys.exit(1 if any(m.startswith('scapy') for m in sys.modules) else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
