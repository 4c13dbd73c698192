"""Hostfile + cluster config parsing: FlagScale compatibility, clear errors, fuzzing (never a crash)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.errors import ConfigError, ConfigErrors
from cluster.fleet.hostfile import (
    ClusterConfig,
    hostfile_keys_markdown,
    load_hostfile,
    parse_hostfile_text,
    parse_yaml_config,
    render_hostfile,
)

REPO = Path(__file__).resolve().parents[1]


def errors_of(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_hostfile_text(text, "hf")
    return str(err.value)


def test_flagscale_hostfile_loads_unchanged() -> None:
    cfg = parse_hostfile_text("# FlagScale\n10.1.1.1 slots=8 type=A800\n\n10.1.1.2 slots=8 type=A800  # second\n", "hf")
    assert [h.address for h in cfg.hosts] == ["10.1.1.1", "10.1.1.2"]
    assert [h.slots for h in cfg.hosts] == [8, 8] and cfg.hosts[0].gpu_type == "A800"
    assert cfg.head.address == "10.1.1.1" and [h.address for h in cfg.workers] == ["10.1.1.2"]
    assert cfg.total_slots == 16
    assert cfg.settings.ssh.user == "root" and cfg.settings.docker is None


def test_per_host_user_port_ip_and_head_mark() -> None:
    cfg = parse_hostfile_text("gpu-a slots=8 ip=10.0.0.1\nubuntu@gpu-b slots=4 port=2222 head\ngpu-c slots=8 user=ops\n", "hf")
    a, b, c = cfg.hosts
    assert cfg.head is b and a.ray_ip == "10.0.0.1" and b.ray_ip == "gpu-b"
    assert cfg.ssh_user(b) == "ubuntu" and cfg.ssh_port(b) == 2222
    assert cfg.ssh_user(c) == "ops" and cfg.ssh_port(c) == 22
    assert [h.line for h in cfg.hosts] == [1, 2, 3]


def test_cluster_section() -> None:
    cfg = parse_hostfile_text(
        "10.0.0.1 slots=8\n[cluster]\nssh.user = ubuntu\nssh.key = ~/.ssh/id_ed25519\nray.version = 2.58.0\n"
        "ray.num_cpus = 32\ndocker.image = reg/flagrelease:tag\ndocker.shm_size = 512g\n"
        "docker.volumes = [/nfs:/nfs]\nenv.NCCL_DEBUG = INFO\nenv.USE_FLAGGEMS = 1\n", "hf")
    s = cfg.settings
    assert s.ssh.user == "ubuntu" and s.ray.version == "2.58.0" and s.ray.num_cpus == 32
    assert s.docker is not None and s.docker.image == "reg/flagrelease:tag" and s.docker.volumes == ["/nfs:/nfs"]
    assert s.env == {"NCCL_DEBUG": "INFO", "USE_FLAGGEMS": "1"}


def test_yaml_cluster_file(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("10.0.0.1 slots=8\n10.0.0.2 slots=8\n")
    (tmp_path / "c.yaml").write_text("hostfile: hosts\nssh:\n  user: ubuntu\nray:\n  port: 6380\n")
    cfg = load_hostfile(tmp_path / "c.yaml")
    assert len(cfg.hosts) == 2 and cfg.settings.ssh.user == "ubuntu" and cfg.settings.ray.port == 6380
    (tmp_path / "d.yaml").write_text("hosts:\n  - 10.0.0.1 slots=8\n  - 10.0.0.2 slot=8\nray:\n  port: 99999\n")
    with pytest.raises(ConfigError) as err:
        load_hostfile(tmp_path / "d.yaml")
    msg = str(err.value)
    assert "line 3: unknown key 'slot'" in msg  # the list item's line in the YAML file
    assert "line 5: ray.port" in msg and "65535" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1\n", "line 1: host '10.0.0.1' has no slots=\n  fix: add slots=N"),
        ("10.0.0.1 slots=0\n", "line 1: slots: Input should be greater than or equal to 1"),
        ("10.0.0.1 slots=8 port=70000\n", "line 1: port: Input should be less than or equal to 65535"),
        ("10.0.0.1 slots=8 typ=H100\n", "line 1: unknown key 'typ'\n  fix: did you mean 'type'?"),
        ("10.0.0.1 slots=8 slots=4\n", "line 1: 'slots' given twice"),
        ("bad_host! slots=8\n", "line 1: host: 'bad_host!' is not a hostname or an IP address"),
        ("slots=8 10.0.0.1\n", "line 1: line starts with 'slots=8', not a host"),
        ("a slots=1 head\nb slots=1 head\n", "line 2: more than one host is marked head (lines 1, 2)"),
        ("a slots=1\na slots=1\n", "line 2: host 'a' (SSH port 22) is listed twice (first on line 1)"),
        ("# only comments\n\n", "no hosts listed"),
        ("a slots=1\n[clustr]\n", "line 2: unknown section [clustr]\n  fix: did you mean 'cluster'?"),
        ("a slots=1\n[cluster]\nssh.usr = x\n", "line 3: ssh.usr: Extra inputs are not permitted"),
        ("a slots=1\n[cluster]\njust words\n", "line 3: 'just words' is not 'key = value'"),
        ("a slots=1\n[cluster]\ndocker.shm_size = 32G\n", "line 3: docker.image: Field required"),
        ("a slots=1\n[cluster]\nenv.1BAD = x\n", "env: Value error"),
        ("a slots=1\n[cluster]\nray.port = 8265\n", "ray.port, ray.dashboard_port and ray.client_server_port must differ"),
        ("a slots=1 ip=not-an-ip\n", "line 1: ip:"),
        ("a slots=1 cpus=many\n", "line 1: cpus='many' is not a whole number\n  fix: set cpus= to the logical CPUs"),
        ("a slots=1 cpus=0\n", "line 1: cpus: Input should be greater than or equal to 1"),
    ],
)
def test_malformed_lines_name_line_and_fix(text: str, expected: str) -> None:
    msg = errors_of(text)
    assert msg.startswith("hf")
    first = expected.split("\n")[0]
    if expected == "env: Value error":
        assert "'1BAD' is not an environment variable name" in msg
        return
    assert first in msg, msg
    if "\n" in expected:
        assert expected in msg, msg


def test_all_errors_reported_at_once() -> None:
    msg = errors_of("a slot=1\nb slots=x\nc slots=1 foo\n")
    assert "line 1:" in msg and "line 2:" in msg and "line 3:" in msg


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the hostfile"):
        load_hostfile(tmp_path / "missing")
    (tmp_path / "bin").write_bytes(b"a slots=1\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="line 2: not UTF-8"):
        load_hostfile(tmp_path / "bin")
    (tmp_path / "bad.yaml").write_text("hosts: [a slots=1\n  ray: {\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_hostfile(tmp_path / "bad.yaml")


def test_render_roundtrip() -> None:
    cfg = parse_hostfile_text("a slots=2 type=H100 user=u port=2 ip=10.0.0.9 cpus=16 head\nb slots=8\n", "hf")
    again = parse_hostfile_text(render_hostfile(cfg), "hf")
    assert [h.model_dump(exclude={"line"}) for h in again.hosts] == [h.model_dump(exclude={"line"}) for h in cfg.hosts]


@pytest.mark.parametrize("path", sorted((REPO / "hostfiles").glob("*")), ids=lambda p: p.name)
def test_example_hostfiles_load(path: Path) -> None:
    if path.suffix == ".md":
        pytest.skip("readme")
    cfg = load_hostfile(path)
    assert isinstance(cfg, ClusterConfig) and cfg.hosts


# ------------------------------------------------- the cases of issue 10 (a 57-case corpus)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Only ASCII digits: str.isdigit() took these, and int('²') raised a bare ValueError.
        ("a slots=\u00b2\n", "line 1: holds '\u00b2' (U+00B2, SUPERSCRIPT TWO); host lines are plain ASCII"),
        ("a slots=\uff18\n", "line 1: holds '\uff18' (U+FF18, FULLWIDTH DIGIT EIGHT)"),
        ("a slots=8 port=\u0662\u0662\n", "line 1: holds '\u0662' (U+0662, ARABIC-INDIC DIGIT TWO)"),
        ("a slots=8\u200b\n", "ZERO WIDTH SPACE"),
        ("a slots=1\n\ufeffb slots=1\n", "line 2: holds '\\ufeff' (U+FEFF, a byte-order mark (BOM))"),
        # Duplicates by SSH endpoint (address, effective port) and by the address Ray uses.
        ("a slots=1\na slots=1 port=22\n", "line 2: host 'a' (SSH port 22) is listed twice (first on line 1)"),
        ("A slots=1\na. slots=1\n", "line 2: host 'a.' (SSH port 22) is listed twice (first on line 1)"),
        ("a slots=1 port=2222\na slots=1\n[cluster]\nssh.port = 2222\n", "line 2: host 'a' (SSH port 2222) is listed twice"),
        ("::1 slots=1\n0::1 slots=1\n", "line 2: host '0::1' (SSH port 22) is listed twice"),
        ("a slots=1 ip=10.0.0.1\nb slots=1 ip=10.0.0.1\n",
         "line 2: Ray address '10.0.0.1' is used twice (first on line 1): one host would carry two Ray nodes\n"
         "  fix: give each host its own ip="),
        ("10.0.0.1 slots=1\nb slots=1 ip=10.0.0.1\n", "line 2: Ray address '10.0.0.1' is used twice"),
        ("a slots=1 port=2222\na slots=1 port=2223\n", "line 2: Ray address 'a' is used twice"),
        # FlagScale's extra tokens: rejected, since fleetserve would not honour them.
        ("a slots=8 gpus=0,1\n", "line 1: unknown key 'gpus'\n  fix: remove it: fleetserve has no per-host GPU list"),
        ("a slots=8 head=maybe\n", "line 1: head='maybe' is not true or false"),
        ("a slots=8 port\n", "line 1: 'port' has no value\n  fix: set port= to the SSH port"),
        ("a slots=8 junk\n", "line 1: 'junk' is not key=value"),
        ("a slots=99999999\n", "line 1: slots='99999999' is not a whole number"),
    ],
)
def test_issue10_hostfile_errors(text: str, expected: str) -> None:
    msg = errors_of(text)
    assert expected in msg, msg
    assert "Traceback" not in msg


def test_byte_order_mark_at_the_start_is_skipped(tmp_path: Path) -> None:
    """Editors on Windows start UTF-8 files with a BOM; it is not part of the first host's name."""
    path = tmp_path / "hf"
    path.write_bytes("\ufeff10.1.1.1 slots=8\n".encode())
    assert load_hostfile(path).hosts[0].address == "10.1.1.1"
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_bytes("\ufeffhosts: ['10.1.1.1 slots=8']\n".encode())
    assert load_hostfile(yaml_path).hosts[0].address == "10.1.1.1"


WRITTEN = ["yes", "010", "1:30", "0x1F", "off", "3.0", "null", "~", "1e3", "a: b", "[x]", "a#x"]


def test_env_values_stay_the_text_written() -> None:
    """No YAML 1.1 typing: 'yes' was True, '010' 8, '1:30' 90, '0x1F' 31, 'off' False."""
    lines = [f"env.V{i} = {v}" for i, v in enumerate(WRITTEN)]
    cfg = parse_hostfile_text("a slots=1\n[cluster]\n" + "\n".join(lines) + "\nenv.Q = 'quoted' # comment\nenv.E =\n", "hf")
    expected = {f"V{i}": v for i, v in enumerate(WRITTEN)}
    assert cfg.settings.env == {**expected, "Q": "quoted", "E": ""}


def test_yaml_config_values_stay_the_text_written() -> None:
    values = {k: v for k, v in zip(("A", "B", "C", "D", "E"), ("yes", "010", "1:30", "0x1F", "off"))}
    text = "hosts: ['a slots=1']\nenv:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items())
    text += "ray:\n  version: 2.10\n  port: 6380\nssh:\n  use_agent: off\n"
    cfg = parse_yaml_config(text, "c.yaml", Path("."))
    assert cfg.settings.env == values
    # 2.10 stays '2.10' (YAML 1.1 made it the float 2.1); typed settings are still typed.
    assert cfg.settings.ray.version == "2.10" and cfg.settings.ray.port == 6380 and cfg.settings.ssh.use_agent is False
    with pytest.raises(ConfigError, match=r"env\.A is a list, not a string"):
        parse_yaml_config("hosts: ['a slots=1']\nenv:\n  A: [1, 2]\n", "c.yaml", Path("."))


def test_ray_version_is_the_text_written_and_a_list_says_quote() -> None:
    assert parse_hostfile_text("a slots=1\n[cluster]\nray.version = 3.0\n", "hf").settings.ray.version == "3.0"
    assert parse_hostfile_text("a slots=1\n[cluster]\nray.version = 2.10\n", "hf").settings.ray.version == "2.10"
    msg = errors_of("a slots=1\n[cluster]\nray.version = [3]\n")
    assert "line 3: ray.version" in msg and 'quote it if it looks like a number, e.g. ray.version = "2.10"' in msg


@pytest.mark.parametrize("text", ["a slots=\u0038\n", "a slots=8 port=22\n", "a slots=8 cpus=64\n"])
def test_ascii_digits_accepted(text: str) -> None:
    assert parse_hostfile_text(text, "hf").hosts[0].slots == 8


def test_non_ascii_digits_in_cluster_section_rejected() -> None:
    msg = errors_of("a slots=1\n[cluster]\nssh.port = \u0662\u0662\nray.num_cpus = \uff18\n")
    assert "line 3: ssh.port: Input should be a valid integer" in msg and "line 4: ray.num_cpus" in msg


def test_flagscale_comments_underscores_and_crlf() -> None:
    cfg = parse_hostfile_text("node_1 slots=8#comment\r\nnode_2 slots=8 type=A800# c\r\n", "hf")
    assert [(h.address, h.slots, h.gpu_type) for h in cfg.hosts] == [("node_1", 8, None), ("node_2", 8, "A800")]


def test_large_file_is_linear_and_its_errors_capped() -> None:
    """20,000 hosts without slots= (12 s and 1.2 MB of output before): every error kept, 20 shown."""
    text = "".join(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}\n" for i in range(20_000))
    with pytest.raises(ConfigErrors) as err:
        parse_hostfile_text(text, "hf")
    assert len(err.value.errors) == 20_000
    msg = str(err.value)
    assert msg.count("has no slots=") == 20 and msg.endswith("... and 19980 more errors")


def test_docs_key_table_is_the_parser_table() -> None:
    assert hostfile_keys_markdown() in (REPO / "docs" / "cluster.md").read_text()


def test_repo_paths_named_in_readme_and_deployments_exist_and_parse() -> None:
    """The README and the deployment files' comments name hostfiles a new user will pass to `fleetserve up`."""
    import re

    named: set[str] = set()
    for doc in [REPO / "README.md", *sorted((REPO / "deployments").glob("*.yaml"))]:
        named |= set(re.findall(r"hostfiles/[A-Za-z0-9_.-]+", doc.read_text()))
    assert "hostfiles/h100x8.hostfile" in named
    for rel in sorted(named):
        cfg = load_hostfile(REPO / rel)
        assert cfg.hosts, rel


# ------------------------------------------------------------------------ fuzzing

_token = st.one_of(
    st.sampled_from(["slots=8", "slots=", "slots=-1", "slots=99999999", "type=H100", "user=root", "port=22",
                     "port=0", "head", "head=maybe", "ip=10.0.0.1", "ip=x", "=", "==", "#", "slot=2", "@", "a@b"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
)
_line = st.one_of(
    st.lists(_token, min_size=1, max_size=6).map(" ".join),
    st.sampled_from(["[cluster]", "[hosts]", "[x]", "ssh.user = root", "ray.port = x", "docker.image =", "env.A = 1",
                     "ssh = 3", "ssh.port = [1, 2]", "ray.num_cpus = {a: 1}", "docker = null", "10.0.0.1 slots=8"]),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_line, max_size=12).map("\n".join))
def test_fuzz_hostfile_only_clear_errors(text: str) -> None:
    try:
        cfg = parse_hostfile_text(text, "fuzz")
    except ConfigError as exc:
        msg = str(exc)
        assert msg.startswith("fuzz") and "Traceback" not in msg
        for err in getattr(exc, "errors", [exc]):
            assert err.problem and err.fix, f"error without a fix: {err}"
        return
    assert cfg.hosts and all(h.slots >= 1 for h in cfg.hosts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_fuzz_arbitrary_unicode_only_clear_errors(text: str) -> None:
    """Any Unicode text, including after a valid first line and inside [cluster]."""
    for candidate in (text, "a slots=1\n" + text, "a slots=1\n[cluster]\n" + text):
        try:
            parse_hostfile_text(candidate, "fuzz")
        except ConfigError as exc:
            assert str(exc).startswith("fuzz")
            for err in getattr(exc, "errors", [exc]):
                assert err.problem and err.fix, f"error without a fix: {err}"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["hf", "c.yaml"]))
def test_fuzz_hostfile_bytes_only_clear_errors(tmp_path_factory: pytest.TempPathFactory, data: bytes, name: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data)
    try:
        load_hostfile(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10), st.floats(allow_nan=True)),
                    lambda children: st.one_of(st.lists(children, max_size=3),
                                               st.dictionaries(st.sampled_from(["hosts", "hostfile", "ssh", "ray", "docker",
                                                                                "env", "user", "port", "image", "x"]),
                                                               children, max_size=4)),
                    max_leaves=12))
def test_fuzz_yaml_config_only_clear_errors(data: object) -> None:
    import yaml

    text = yaml.safe_dump(data)
    try:
        parse_yaml_config(text, "fuzz.yaml", Path("/nonexistent-dir"))
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml") or "/nonexistent-dir" in str(exc)


def test_up_help_shows_the_cluster_section() -> None:
    """Rich markup took ``[cluster]`` for a style tag and printed 'optional  section'."""
    import subprocess
    import sys

    fleetserve = Path(sys.executable).parent / "fleetserve"
    r = subprocess.run([str(fleetserve), "up", "--help"], capture_output=True, text=True, timeout=120,
                       env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "TERM": "dumb"})
    assert r.returncode == 0, r.stderr
    assert "optional [cluster] section" in r.stdout, r.stdout
