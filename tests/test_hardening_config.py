"""Hardening of the configuration file handling: locking, what may be written, one-line errors, comments,
strict numbers, refused cluster addresses and the one check pass (``config.check``)."""

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from encapfwd import config as cfg
from encapfwd import hookimpl, model
from encapfwd.config import toml as cfg_toml
from encapfwd.errors import ConfigError
from encapfwd.hookspecs import Forwarder
from encapfwd.model import Cluster, Config, Port, Server
from encapfwd.plugins import get_plugin_manager

from conftest import BIN, ROOT, run_cli

EXAMPLE = ROOT / "examples" / "encapfwd.toml"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def one_line_error(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("encapfwd: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def base(cli):
    cli("cluster", "add", "10.0.9.9", check=0)
    cli("port", "add", "10.0.9.9@80", check=0)


def only_config_left(folder: Path, *names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# ------------------------------------------------------------------------------ 1. concurrent edits


def test_parallel_edits_are_all_kept(cli, tmp_path):
    base(cli)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCAPFWD_")}
    procs = [
        subprocess.Popen([str(BIN / "encapfwd"), "--config", str(cli.config), "server", "add",
                          f"10.0.9.9@80@10.0.2.{n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=tmp_path)
        for n in range(1, 51)
    ]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(rc == 0 for rc, _, _ in results), [r for r in results if r[0]][:3]
    servers = cfg.load(cli.config).clusters[0].ports[0].servers
    assert sorted(str(s.address) for s in servers) == sorted(f"10.0.2.{n}" for n in range(1, 51))
    only_config_left(tmp_path, "encapfwd.toml")  # no lock file, no temporary file left


def test_an_edit_waits_for_the_lock_and_gives_up_with_one_line(tmp_path):
    path = tmp_path / "c.toml"
    cfg.save(path, cfg.cluster_add(Config(), ["10.0.9.9"]))
    held, release = threading.Event(), threading.Event()

    def holder():
        with cfg.edit(path) as session:
            held.set()
            release.wait(10)
            session.config = cfg.cluster_add(session.config, ["10.0.9.10"])

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        assert (tmp_path / ".c.toml.lock").exists()
        with pytest.raises(ConfigError, match="being changed by another process") as info:
            with cfg.edit(path, timeout=0.3):
                pass
        assert "\n" not in str(info.value)
    finally:
        release.set()
        thread.join(10)
    with cfg.edit(path) as session:  # then it is free again, and the holder's change is there
        session.config = cfg.cluster_add(session.config, ["10.0.9.11"])
    assert [str(c.address) for c in cfg.load(path).clusters] == ["10.0.9.9", "10.0.9.10", "10.0.9.11"]
    only_config_left(tmp_path, "c.toml")


def test_nothing_is_written_when_the_edit_fails(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("# mine\n")
    before = os.stat(path)
    with pytest.raises(ConfigError):
        with cfg.edit(path) as session:
            session.config = cfg.port_add(session.config, "10.0.9.9@80", [])  # no such cluster
    assert path.read_text() == "# mine\n" and os.stat(path).st_mtime_ns == before.st_mtime_ns
    only_config_left(tmp_path, "c.toml")


# ---------------------------------------------------------------------- 2. writing through, refusing


def test_symlinked_config_updates_its_target(cli, tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "encapfwd.toml"
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    link = link_dir / "c.toml"
    link.symlink_to(real)
    cfg.save(real, cfg.cluster_add(Config(), ["10.0.9.9"]))  # a link to a missing file is refused
    os.chmod(real, 0o640)
    if IS_ROOT:
        os.chown(real, 1234, 5678)
    run_cli("--config", str(link), "cluster", "add", "10.0.9.10", check=0)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert [str(c.address) for c in cfg.load(real).clusters] == ["10.0.9.9", "10.0.9.10"]
    st = os.stat(real)
    assert stat.S_IMODE(st.st_mode) == 0o640
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    only_config_left(real_dir, "encapfwd.toml")
    only_config_left(link_dir, "c.toml")


@pytest.mark.skipif(not IS_ROOT, reason="changing a file's owner needs root")
def test_owner_group_and_mode_are_kept(cli):
    base(cli)
    os.chown(cli.config, 4321, 8765)
    os.chmod(cli.config, 0o604)
    cli("server", "add", "10.0.9.9@80@10.0.2.10", check=0)
    st = os.stat(cli.config)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 8765, 0o604)


def _device_node(tmp_path):
    """A character device to point --config at: a private copy of /dev/null when root (so that a broken
    implementation cannot replace the real one), /dev/null itself otherwise (not writable then)."""
    if IS_ROOT:
        node = tmp_path / "null"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return node
    return Path("/dev/null")


def test_device_node_is_refused_and_left_alone(tmp_path):
    node = _device_node(tmp_path)
    before = os.stat(node)
    proc = run_cli("--config", str(node), "cluster", "add", "10.0.9.9", cwd=tmp_path)
    one_line_error(proc, "is a character device, not a regular file")
    after = os.stat(node)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino and after.st_rdev == before.st_rdev
    if IS_ROOT:
        only_config_left(tmp_path, "null")


def test_dev_null_itself_is_refused_before_anything_is_written():
    # through cfg.edit, never cfg.save: code without the check would replace /dev/null by a file
    before = os.stat("/dev/null")
    with pytest.raises(ConfigError, match="^/dev/null is a character device, not a regular file"):
        with cfg.edit("/dev/null"):
            pytest.fail("the body of an edit of /dev/null ran")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert not Path("/dev/.null.lock").exists()


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for args in (["cluster", "add", "10.0.9.9"], ["server", "report"]):
        proc = subprocess.run([str(BIN / "encapfwd"), "--config", str(fifo), *args], capture_output=True,
                              text=True, timeout=20, cwd=tmp_path)
        one_line_error(proc, "named pipe (FIFO)")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    only_config_left(tmp_path, "fifo.toml")


def test_directory_dangling_link_and_hard_link_are_refused(tmp_path):
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    one_line_error(run_cli("--config", str(folder), "cluster", "add", "10.0.9.9"), "is a directory")

    dangling = tmp_path / "dangling.toml"
    dangling.symlink_to(tmp_path / "missing.toml")
    one_line_error(run_cli("--config", str(dangling), "cluster", "add", "10.0.9.9"),
                   "is a symbolic link to", "which does not exist")
    assert dangling.is_symlink() and not (tmp_path / "missing.toml").exists()

    first = tmp_path / "first.toml"
    cfg.save(first, cfg.cluster_add(Config(), ["10.0.9.9"]))
    second = tmp_path / "second.toml"
    os.link(first, second)
    before = first.read_bytes()
    one_line_error(run_cli("--config", str(second), "cluster", "add", "10.0.9.10"), "has 2 hard links")
    assert os.stat(first).st_ino == os.stat(second).st_ino and first.read_bytes() == before
    only_config_left(tmp_path, "folder.toml", "dangling.toml", "first.toml", "second.toml")


def test_a_new_file_is_created(tmp_path):
    path = tmp_path / "new.toml"
    with cfg.edit(path) as session:
        assert session.text is None
        session.config = cfg.cluster_add(session.config, ["10.0.9.9"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert cfg.load(path).clusters[0].address == model.parse_ip("10.0.9.9")


# ------------------------------------------------------------------------------- 3. one-line errors


@pytest.mark.parametrize("content,needle", [
    ("[executor]\nnfa = \"10.0.2.1\"\n".encode("utf-16"), "not UTF-8 (it starts with a UTF-16"),
    (b'[executor]\ninterface = "caf\xe9"\n', "not UTF-8 (invalid byte 0xe9 on line 2)"),
    (b"a = " + b"[" * 4000, "nested more than"),
    (b"a = " + b"{b = " * 4000, "nested more than"),
], ids=["utf16-bom", "latin1", "deep-arrays", "deep-inline-tables"])
def test_unreadable_configs_are_one_line_errors(cli, content, needle):
    cli.config.write_bytes(content)
    for args in (["server", "report"], ["cluster", "add", "10.0.9.9"]):
        one_line_error(cli(*args), needle)
    assert cli.config.read_bytes() == content
    only_config_left(cli.config.parent, "encapfwd.toml")


def test_recursion_in_the_parser_is_caught(monkeypatch):
    monkeypatch.setattr(cfg_toml, "MAX_NESTING", 100000)  # let the text reach the parser
    with pytest.raises(ConfigError, match="invalid TOML: nested too deeply"):
        cfg.loads("a = " + "[" * 100000)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'\xef\xbb\xbf[executor]\nmtu = 9000\n')
    assert cfg.load(path).executor.mtu == 9000


@pytest.fixture
def small_tmpfs(tmp_path):
    if not IS_ROOT or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=64", "encapfwd-test", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_one_line_and_keeps_the_file(small_tmpfs):
    path = small_tmpfs / "encapfwd.toml"
    run_cli("--config", str(path), "cluster", "add", "10.0.9.9", check=0)
    before = path.read_bytes()
    with open(small_tmpfs / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    proc = run_cli("--config", str(path), "cluster", "add", "10.0.9.10")
    one_line_error(proc, f"cannot write {path}: No space left on device")
    assert path.read_bytes() == before
    only_config_left(small_tmpfs, "encapfwd.toml", "filler")


# ------------------------------------------------------------------------------ 4. comments are kept


def comment_lines(text):
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]


def test_example_comments_survive_cli_edits(cli):
    shutil.copy(EXAMPLE, cli.config)
    original = EXAMPLE.read_text()
    cli("server", "set", "10.0.9.9@80@10.0.2.10", "weight", "5", check=0)
    cli("cluster", "add", "10.0.9.12", check=0)
    cli("server", "remove", "10.0.9.9@80@10.0.3.10", check=0)
    cli("executor", "set", "mtu", "9000", check=0)
    text = cli.config.read_text()
    assert comment_lines(text) == comment_lines(original)  # every one, in order

    expected = cfg.loads(original)
    expected = cfg.server_set(expected, "10.0.9.9@80@10.0.2.10", ["weight", "5"])
    expected = cfg.cluster_add(expected, ["10.0.9.12"])
    expected = cfg.server_remove(expected, "10.0.9.9@80@10.0.3.10")
    expected = cfg.executor_set(expected, ["mtu", "9000"])
    assert cfg.load(cli.config) == expected
    # only what changed changed: the rest of the file is line for line the original
    assert "weight = 5" in text and "mtu = 9000" in text and 'address = "10.0.3.10"' not in text
    assert 'encapttl = 64' in text  # an explicit default stays explicit


def apply_edits(path, *edits):
    for edit in edits:
        with cfg.edit(path) as session:
            session.config = edit(session.config)


def test_comments_of_removed_objects_go_with_them(tmp_path):
    path = tmp_path / "c.toml"
    shutil.copy(EXAMPLE, path)
    original = EXAMPLE.read_text()
    apply_edits(path, lambda c: cfg.cluster_remove(c, ["10.0.9.10"]))
    text = path.read_text()
    dns = [line for line in comment_lines(original) if line.startswith("# DNS over GRE")]
    assert dns and dns[0] not in text
    assert comment_lines(text) == [line for line in comment_lines(original) if line != dns[0]]
    # removing the first cluster keeps the comment of the one after it
    apply_edits(path, lambda c: cfg.cluster_remove(c, ["10.0.9.9"]))
    text = path.read_text()
    assert "# A web cluster" not in text and "# Every port (0)" in text and "# IPv6 works" in text
    assert text.splitlines()[0].startswith("# Example encapfwd configuration")


def test_many_edits_keep_comments_and_load_as_expected(tmp_path):
    path = tmp_path / "c.toml"
    text = ("# head\n\n[executor]  # the dispatcher\nnfa = \"10.0.2.1\"  # own address\n\n"
            "# web\n[[clusters]]\naddress = \"10.0.9.9\"\n[[clusters.ports]]  # http\nnumber = 80\n"
            "[[clusters.ports.servers]]\naddress = \"10.0.2.10\"  # first\nweight = 2  # heavier\n"
            "# second web server\n[[clusters.ports.servers]]\naddress = \"10.0.2.11\"\n\n"
            "# dns\n[[clusters]]\naddress = \"10.0.9.10\"\nports = []\n# tail\n")
    path.write_text(text)
    edits = [
        lambda c: cfg.server_set(c, "10.0.9.9@80@10.0.2.10", ["weight", "7", "grekey", "none"]),
        lambda c: cfg.server_add(c, "10.0.9.9@80@10.0.2.12", ["mac", "02:00:00:00:00:12"]),
        lambda c: cfg.port_add(c, "10.0.9.10@53", ["porttype", "udp"]),
        lambda c: cfg.server_add(c, "10.0.9.10@53@10.0.4.10", ["encapforward", "yes", "encaptype", "gre"]),
        lambda c: cfg.server_remove(c, "10.0.9.9@80@10.0.2.11"),
        lambda c: cfg.executor_set(c, ["networks", "10.0.2.0/24", "mtu", "1400"]),
        lambda c: cfg.server_status(c, "10.0.9.9@80@10.0.2.12", True),
    ]
    expected = cfg.loads(text)
    for edit in edits:
        expected = edit(expected)
    apply_edits(path, *edits)
    out = path.read_text()
    assert cfg.load(path) == expected
    kept = [line for line in comment_lines(text) if line != "# second web server"]
    assert comment_lines(out) == kept
    for fragment in ("[executor]  # the dispatcher", 'nfa = "10.0.2.1"  # own address',
                     '[[clusters.ports]]  # http', 'address = "10.0.2.10"  # first', "weight = 7  # heavier"):
        assert fragment in out, out
    assert out.endswith("# tail\n")


def test_render_falls_back_to_a_fresh_document_when_it_must():
    old_text = '[[clusters]]\naddress = "10.0.9.9"\n[[clusters]]\naddress = "10.0.9.10"\n'
    old = cfg.loads(old_text)
    new = Config(clusters=tuple(reversed(old.clusters)))  # reordered: not a minimal change
    assert cfg.loads(cfg.render(new, old, old_text)) == new


# --------------------------------------------------------------------------- 5. stale temporary files


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path):
    path = tmp_path / "encapfwd.toml"
    cfg.save(path, cfg.cluster_add(Config(), ["10.0.9.9"]))
    code = (
        "import os, sys\n"
        "from encapfwd import config as cfg\n"
        "os.replace = lambda *a: os.kill(os.getpid(), 9)\n"  # killed between the write and the rename
        f"cfg.save({str(path)!r}, cfg.cluster_add(cfg.load({str(path)!r}), ['10.0.9.10']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9
    stale = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and re.fullmatch(r"\.encapfwd\.toml\.[a-z0-9_]{8}\.tmp", stale[0])
    unrelated = tmp_path / ".other.toml.abcd1234.tmp"
    unrelated.write_text("not ours")
    run_cli("--config", str(path), "cluster", "add", "10.0.9.11", check=0)
    only_config_left(tmp_path, "encapfwd.toml", ".other.toml.abcd1234.tmp")
    assert [str(c.address) for c in cfg.load(path).clusters] == ["10.0.9.9", "10.0.9.11"]


# -------------------------------------------------------------------------------- 6. strict numbers


@pytest.mark.parametrize("text", ["0x10", "1_0", "\u0661\u0662", "+5", "-1", " 5", "5 ", "5.0", "", "1e2",
                                  "\uff15", "0b1", "0o7"])
def test_numbers_are_plain_ascii_decimal(text):
    with pytest.raises(ConfigError, match="weight must be a whole number") as info:
        model.parse_int(text, 0, 100, "weight")
    assert "\n" not in str(info.value)


def test_number_rules():
    assert model.parse_int("042", 0, 100, "weight") == 42 and model.parse_int(7, 0, 100, "weight") == 7
    for value in (True, False, 5.0, None, [5]):
        with pytest.raises(ConfigError, match="must be a whole number"):
            model.parse_int(value, 0, 100, "weight")
    with pytest.raises(ConfigError, match="between 0 and 100, got 101"):
        model.parse_int("101", 0, 100, "weight")
    with pytest.raises(ConfigError, match="between 0 and 65535"):
        model.parse_int("9" * 5000, 0, 65535, "port")  # no int() of a huge string
    with pytest.raises(ConfigError, match="invalid port in '10.0.9.9@0x50'"):
        cfg.split_target("10.0.9.9@0x50", 2)
    with pytest.raises(ConfigError, match="invalid port"):
        cfg.split_target("10.0.9.9@\u0668\u0660", 2)
    assert cfg.split_target("10.0.9.9@80", 2)[1] == 80
    with pytest.raises(ConfigError, match="weight must be a whole number"):
        cfg.loads('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
                  '[[clusters.ports.servers]]\naddress = "10.0.2.1"\nweight = true\n')
    assert Server(address="10.0.2.1", weight=5).weight == 5
    assert Port(number="80").number == 80


def test_cli_refuses_lenient_numbers(cli):
    base(cli)
    before = cli.config.read_bytes()
    one_line_error(cli("server", "add", "10.0.9.9@80@10.0.2.10", "weight", "0x10"),
                   "weight must be a whole number")
    one_line_error(cli("port", "add", "10.0.9.9@1_0"), "invalid port")
    one_line_error(cli("executor", "set", "mtu", "\u0661\u0665\u0660\u0660"), "mtu must be a whole number")
    assert cli.config.read_bytes() == before


# ------------------------------------------------------------------------- 7. refused cluster addresses


@pytest.mark.parametrize("address,reason", [
    ("0.0.0.0", "the unspecified address"), ("::", "the unspecified address"),
    ("224.0.0.1", "a multicast address"), ("ff02::1", "a multicast address"),
    ("255.255.255.255", "the broadcast address"),
    ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"),
    ("::ffff:127.0.0.1", "a loopback address"),
    ("169.254.1.1", "a link-local address"), ("fe80::1", "a link-local address"),
])
def test_unusable_cluster_addresses_are_refused(address, reason):
    message = f"is {reason}: a cluster address \\(VIP\\) must be a unicast"
    with pytest.raises(ConfigError, match=message) as info:
        Cluster(address=address)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=reason):
        cfg.cluster_add(Config(), [address])
    with pytest.raises(ConfigError, match=reason):
        cfg.loads(f'[[clusters]]\naddress = "{address}"\n')


def test_usable_cluster_addresses(cli):
    for address in ("10.0.9.9", "192.0.2.80", "2001:db8::9", "203.0.113.1"):
        assert str(Cluster(address=address).address) == str(model.parse_ip(address))
    one_line_error(cli("cluster", "add", "0.0.0.0"), "cluster address 0.0.0.0 is the unspecified address")


# ---------------------------------------------------------------------------- 8. zone IDs, end to end


@pytest.mark.parametrize("args", [
    ["server", "add", "10.0.9.9@80@fe80::1%eth0"],
    ["cluster", "add", "fe80::1%eth0"],
    ["port", "add", "fe80::1%eth0@80"],
    ["executor", "set", "gateway", "fe80::1%eth0"],
])
def test_zone_id_messages_are_one_clear_line(cli, args):
    base(cli)
    proc = cli(*args)
    one_line_error(proc, "invalid IP address: 'fe80::1%eth0' (zone IDs are not accepted)")
    assert "is not an IP address" not in proc.stderr


def test_zone_id_in_the_file_is_one_clear_line(cli):
    cli.config.write_text('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
                          '[[clusters.ports.servers]]\naddress = "fe80::1%eth0"\n')
    one_line_error(cli("server", "report"), f"{cli.config}: invalid IP address: 'fe80::1%eth0' (zone IDs")


# ------------------------------------------------------------------------------- 9. one check pass


def registry_with(*forwarders):
    class Plugin:
        @hookimpl
        def encapfwd_register_forwarders(self, register):
            for forwarder in forwarders:
                register(forwarder)

    return get_plugin_manager(load_entrypoints=False, plugins=[Plugin()])


def config_with(server, cluster="10.0.9.9", algorithm="maglev", executor=None):
    return Config(executor=executor or model.Executor(),
                  clusters=[Cluster(address=cluster, ports=[Port(number=80, selectionalgorithm=algorithm,
                                                                 servers=[server])])])


MAC = Forwarder(name="mac", overhead=0, ipv4_only=False, encapsulates=False)
IPIP = Forwarder(name="ipip", overhead=20)


def test_check_rules_and_messages():
    full = registry_with(MAC, IPIP)
    cases = [
        (config_with(Server(address="2001:db8::1", encapforward=True)), None,
         "server 10.0.9.9@80@2001:db8::1: encapsulation forwarding is only valid for IPv4"),
        (config_with(Server(address="10.0.2.1", encapforward=True), cluster="2001:db8::9"), None,
         "server 2001:db8::9@80@10.0.2.1: encapsulation forwarding is only valid for IPv4"),
        (config_with(Server(address="10.0.2.1", grekey=5)), None,
         "server 10.0.9.9@80@10.0.2.1: grekey is only valid with encaptype gre"),
        (config_with(Server(address="10.0.2.1"), algorithm="random"), full,
         "port 10.0.9.9@80: unknown selectionalgorithm 'random'"),
        (config_with(Server(address="10.0.2.1", encapforward=True, encaptype="gre")), full,
         "server 10.0.9.9@80@10.0.2.1: encaptype gre: "),
        (config_with(Server(address="10.0.2.1", encapforward=True, encaptype="mac")), full,
         "server 10.0.9.9@80@10.0.2.1: encaptype 'mac' is not an encapsulation"),
        (config_with(Server(address="10.0.2.1")), registry_with(IPIP),
         "server 10.0.9.9@80@10.0.2.1: forwarding method mac: "),
        (config_with(Server(address="2001:db8::10"), cluster="2001:db8::9"),
         registry_with(Forwarder(name="mac", overhead=0, ipv4_only=True, encapsulates=False)),
         "server 2001:db8::9@80@2001:db8::10: forwarding method 'mac' carries IPv4 only"),
    ]
    for config, registry, message in cases:
        with pytest.raises(ConfigError) as info:
            cfg.check(config, registry)
        assert message in str(info.value) and "\n" not in str(info.value)
    cfg.check(config_with(Server(address="10.0.2.1", encapforward=True)), full)
    cfg.check(config_with(Server(address="2001:db8::10"), cluster="2001:db8::9"), full)
    # encapcond auto on an attached network is MAC-forwarded: the mac forwarder must be installed
    auto = config_with(Server(address="10.0.2.1", encapforward=True, encapcond="auto"),
                       executor=model.Executor(networks="10.0.2.0/24"))
    cfg.check(auto, full)
    with pytest.raises(ConfigError, match="forwarding method mac: .*encapfwd-mac"):
        cfg.check(auto, registry_with(IPIP))


def test_missing_encaptype_is_reported_before_missing_mac():
    config = Config(clusters=[Cluster(address="10.0.9.9", ports=[Port(number=80, servers=[
        Server(address="10.0.2.10"), Server(address="10.0.3.10", encapforward=True, encaptype="gre")])])])
    with pytest.raises(ConfigError, match="install the encapfwd-gre distribution"):
        cfg.check(config, registry_with())


def test_duplicates_and_ipv6_encapsulation_are_refused_on_load():
    with pytest.raises(ConfigError, match="server 10.0.9.9@80@10.0.2.1 is defined twice"):
        cfg.loads('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
                  '[[clusters.ports.servers]]\naddress = "10.0.2.1"\n'
                  '[[clusters.ports.servers]]\naddress = "10.0.2.1"\n')
    with pytest.raises(ConfigError, match="encapsulation forwarding is only valid for IPv4"):
        cfg.loads('[[clusters]]\naddress = "10.0.9.9"\n[[clusters.ports]]\nnumber = 80\n'
                  '[[clusters.ports.servers]]\naddress = "2001:db8::1"\nencapforward = true\n')


def test_every_command_checks_the_result():
    config = cfg.port_add(cfg.cluster_add(Config(), ["10.0.9.9"]), "10.0.9.9@80", [])
    config = cfg.server_add(config, "10.0.9.9@80@10.0.2.10", [])
    only_ipip = registry_with(IPIP)
    for command in (lambda: cfg.executor_set(config, ["mtu", "1400"], only_ipip),
                    lambda: cfg.cluster_add(config, ["10.0.9.10"], only_ipip),
                    lambda: cfg.port_remove(cfg.port_add(config, "10.0.9.9@81", []), "10.0.9.9@81",
                                            only_ipip)):
        with pytest.raises(ConfigError, match="forwarding method mac"):
            command()


# ----------------------------------------------------------------------------- 10. and 11. the model


def test_dead_constant_is_gone_and_server_key_lives_in_model():
    from encapfwd.cli import server_rows as report

    assert not hasattr(model, "ENCAPTYPES_BUILTIN")
    assert report.server_key is model.server_key
    assert model.server_key("10.0.9.9", 80, "10.0.2.10") == "10.0.9.9@80@10.0.2.10"


def test_server_model_no_longer_checks_cross_field_rules():
    # the IPv4-only rule is checked once, by config.check (the command that adds the server runs it)
    assert Server(address="2001:db8::1", encapforward=True).encapforward is True
