"""The configuration: discovery, relative paths, units, defaults, errors, cache.

The promises tested here are in ``docs/spec.rst`` ("Configuration").
"""

from __future__ import annotations

import subprocess

import pytest

from jobspool import config
from jobspool.config import parse_duration, parse_size
from tests.kit import (
    CONFIG,
    assert_fails,
    assert_ok,
    read_table,
    run,
)

# --- units ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MB", 10_000_000),
        ("1MiB", 1_048_576),
        ("64KB", 64_000),
        ("1KiB", 1024),
        ("2GB", 2_000_000_000),
        ("512B", 512),
        (512, 512),
        ("512", 512),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "10 parsecs", "MB", -1, True, "", None, [1]])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("300", 300),
        (300, 300),
        (1.5, 1.5),
        ("1w", 604800),
        ("1.5h", 5400),
        (" 90m ", 5400),
        ("500ms", 0.5),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


# What systemd writes in TimeoutStopSec= and friends (systemd.time(7)).
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5min", 300),
        ("1h 30min", 5400),
        ("1h30m", 5400),
        ("2d", 172800),
        ("500ms", 0.5),
        ("5 minutes", 300),
        ("1hour 1minute 1second", 3661),
        ("2 hr", 7200),
        ("3sec", 3),
        ("250msec", 0.25),
        ("1500us", 0.0015),
        ("1500usec", 0.0015),
        ("1500µs", 0.0015),
        ("1week", 604800),
        ("2weeks", 1209600),
        ("1day 12h", 129600),
        ("1M", 2629800),
        ("1 month", 2629800),
        ("1y", 31557600),
        ("2years", 63115200),
        ("1h 30", 3630),
        ("0", 0),
        ("1.5min", 90),
    ],
)
def test_durations_in_systemd_syntax(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_m_is_a_minute_and_M_a_month_as_in_systemd():
    assert parse_duration("1m") == 60
    assert parse_duration("1M") == 2629800


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "5 mins",
        "5 parsecs",
        "-5",
        "5m -3s",
        -5,
        True,
        "",
        "  ",
        None,
        "min",
        "1h 30x",
        "1..5s",
        "5MIN",
        "1h,30m",
        "1" * 5000 + "x",
    ],
)
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_a_systemd_duration_in_the_configuration_is_read(tmp_path):
    path = tmp_path / "jobspool.yaml"
    path.write_text(
        "spool: spool\n"
        "interfaces:\n  orders_in: {command: [/bin/true], timeout: 1h 30min}\n"
        "daemon: {grace: 1min 30s, rescan: 5min, backoff_max: 500ms}\n"
    )
    cfg = config.load(str(path))
    assert cfg.interfaces["orders_in"].timeout == 5400
    assert (cfg.daemon.grace, cfg.daemon.rescan, cfg.daemon.backoff_max) == (90, 300, 0.5)


# --- loading -------------------------------------------------------------------


def test_paths_are_relative_to_the_configuration_file(configured, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load(configured.config)
    assert cfg.path == configured.config
    assert cfg.spool == tmp_path / "spool"
    assert cfg.interfaces["orders_in"].schema == tmp_path / "schemas" / "order.xsd"
    assert cfg.interfaces["stock_in"].schema == tmp_path / "schemas" / "stock.rng"


def test_a_relative_command_is_relative_to_the_configuration_file(configured):
    configured.config.write_text(CONFIG.replace("[/bin/true]", "[handlers/import, --fast]", 1))
    cfg = config.load(configured.config)
    assert cfg.interfaces["orders_in"].command == (
        str(configured.dir / "handlers" / "import"),
        "--fast",
    )
    # A bare program name is looked up on $PATH, so it stays as it is.
    assert cfg.interfaces["stock_in"].command == ("/bin/true",)


def test_configured_values_and_defaults(configured):
    cfg = config.load(configured.config)
    orders_in = cfg.interfaces["orders_in"]
    assert (orders_in.timeout, orders_in.max_size) == (30, 1000)
    assert not orders_in.outbound
    # orders_out sets neither: the defaults are 300 seconds and 10MB.
    orders_out = cfg.interfaces["orders_out"]
    assert (orders_out.timeout, orders_out.max_size) == (300, 10_000_000)
    assert orders_out.outbound
    assert orders_out.command is None
    assert orders_out.handler is None


@pytest.mark.parametrize(
    ("timeout", "max_size", "seconds", "size"),
    [
        ("30s", "10MB", 30, 10_000_000),
        ("5m", "1MiB", 300, 1_048_576),
        ("1d", 4096, 86400, 4096),
        (300, "64KB", 300, 64_000),
    ],
)
def test_units_in_the_file(configured, timeout, max_size, seconds, size):
    configured.config.write_text(
        "interfaces:\n"
        "  orders_in:\n"
        "    command: [/bin/true]\n"
        f"    timeout: {timeout}\n"
        f"    max_size: {max_size}\n"
    )
    iface = config.load(configured.config).interfaces["orders_in"]
    assert (iface.timeout, iface.max_size) == (seconds, size)


def test_an_interface_without_schema_checks_well_formedness_only(configured):
    configured.config.write_text("interfaces:\n  plain_out: {}\n")
    assert config.load(configured.config).interfaces["plain_out"].schema is None


# --- errors: exit 78, one line naming the file and the key ---------------------

BASE = """\
spool: spool
interfaces:
  orders_in:
    schema: schemas/order.xsd
    command: [/bin/true]
"""

BROKEN_CONFIGS = [
    pytest.param(BASE + "colour: red\n", "colour", "unknown key", id="unknown-top-level-key"),
    pytest.param(
        BASE + "    colour: red\n",
        "interfaces.orders_in.colour",
        "unknown key",
        id="unknown-interface-key",
    ),
    pytest.param(
        BASE + "    timeout: abc\n", "interfaces.orders_in.timeout", "duration", id="timeout-abc"
    ),
    pytest.param(
        BASE + "    timeout: 0\n", "interfaces.orders_in.timeout", "above zero", id="timeout-zero"
    ),
    pytest.param(
        BASE + "    max_size: lots\n", "interfaces.orders_in.max_size", "size", id="max-size-lots"
    ),
    pytest.param(
        BASE.replace("order.xsd", "missing.xsd"),
        "interfaces.orders_in.schema",
        "existing schema file",
        id="missing-schema",
    ),
    pytest.param(
        BASE.replace("order.xsd", "order.dtd"),
        "interfaces.orders_in.schema",
        ".rng",
        id="schema-not-xsd-or-rng",
    ),
    pytest.param(
        BASE.replace("orders_in:", '"orders in":'),
        "interfaces.orders in",
        "name",
        id="interface-name-with-space",
    ),
    pytest.param(
        BASE.replace("orders_in:", "../orders:"),
        "interfaces.../orders",
        "name",
        id="interface-name-dot-dot",
    ),
    pytest.param(
        BASE.replace("orders_in:", "orders/in:"),
        "interfaces.orders/in",
        "name",
        id="interface-name-slash",
    ),
    pytest.param(
        BASE.replace("    command: [/bin/true]\n", ""),
        "interfaces.orders_in",
        "command",
        id="inbound-without-handler",
    ),
    pytest.param(
        BASE + "  orders_out:\n    command: [/bin/true]\n",
        "interfaces.orders_out",
        "fetched",
        id="outbound-with-command",
    ),
    pytest.param("spool: spool\n", "interfaces", "at least one", id="no-interfaces"),
    pytest.param(BASE.replace("spool: spool", "spool: 5"), "spool", "path", id="spool-not-a-path"),
    pytest.param(
        BASE + "daemon:\n  schedule_concurrency: 0\n",
        "daemon.schedule_concurrency",
        "whole number",
        id="schedule-concurrency-zero",
    ),
]


@pytest.mark.parametrize(("text", "key", "expected"), BROKEN_CONFIGS)
def test_a_broken_configuration_exits_78_naming_file_and_key(configured, text, key, expected):
    configured.config.write_text(text)
    line = assert_fails(configured.run("interfaces"), 78)
    assert str(configured.config) in line
    assert f" {key}: " in line
    assert expected in line


def test_a_missing_schema_is_named_however_deep_it_is(configured):
    deep = "schemas/" + "/".join(["partner-acme-corporation"] * 4) + "/missing-order.xsd"
    configured.config.write_text(BASE.replace("schemas/order.xsd", deep))
    line = assert_fails(configured.run("interfaces"), 78)
    assert "missing-order.xsd" in line


def test_invalid_yaml_names_the_line(configured):
    configured.config.write_text(BASE + "    timeout: [30s\n  orders_out: {}\n")
    line = assert_fails(configured.run("interfaces"), 78)
    assert str(configured.config) in line
    assert "line 7" in line
    assert "YAML" in line


def test_a_missing_configuration_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    line = assert_fails(run("-c", str(missing), "interfaces"), 78)
    assert str(missing) in line
    line = assert_fails(run("interfaces", env={"JOBSPOOL_CONFIG": str(missing)}), 78)
    assert str(missing) in line


def test_no_configuration_at_all_exits_78(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = assert_fails(run("interfaces", cwd=empty), 78)
    assert "jobspool.yaml" in line
    assert "-c" in line


# --- discovery: -c, then $JOBSPOOL_CONFIG, then ./jobspool.yaml ------------------


@pytest.fixture
def three_configs(configured):
    """Three configurations, each with one interface named after where it is found."""
    where = {}
    for label, path in [
        ("option", configured.dir / "option.yaml"),
        ("env", configured.dir / "env.yaml"),
        ("cwd", configured.dir / "cwd" / "jobspool.yaml"),
    ]:
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"spool: spool-{label}\ninterfaces:\n  from_{label}_out: {{}}\n")
        assert_ok(run("-c", str(path), "init"))
        where[label] = path
    return where


def interface_names(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [row["INTERFACE"] for row in read_table(assert_ok(result))]


def test_the_configuration_in_the_current_directory_is_found(three_configs):
    cwd = three_configs["cwd"].parent
    assert interface_names(run("interfaces", cwd=cwd)) == ["from_cwd_out"]


def test_jobspool_config_comes_before_the_current_directory(three_configs):
    cwd = three_configs["cwd"].parent
    env = {"JOBSPOOL_CONFIG": str(three_configs["env"])}
    assert interface_names(run("interfaces", cwd=cwd, env=env)) == ["from_env_out"]


def test_the_option_comes_before_everything(three_configs):
    cwd = three_configs["cwd"].parent
    env = {"JOBSPOOL_CONFIG": str(three_configs["env"])}
    result = run("-c", str(three_configs["option"]), "interfaces", cwd=cwd, env=env)
    assert interface_names(result) == ["from_option_out"]
    result = run("--config", str(three_configs["option"]), "interfaces", cwd=cwd, env=env)
    assert interface_names(result) == ["from_option_out"]


def test_a_relative_option_is_relative_to_the_current_directory(three_configs):
    result = run("-c", "option.yaml", "interfaces", cwd=three_configs["option"].parent)
    assert interface_names(result) == ["from_option_out"]


def test_spool_paths_do_not_depend_on_the_current_directory(configured, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert_ok(run("init", cwd=elsewhere, env={"JOBSPOOL_CONFIG": str(configured.config)}))
    assert (configured.dir / "spool" / "queue" / "orders_in").is_dir()
    assert list(elsewhere.iterdir()) == []


# --- the cache -----------------------------------------------------------------


def test_a_changed_configuration_takes_effect_at_once(spool, tmp_path):
    assert interface_names(spool.run("interfaces")) == ["orders_in", "orders_out", "stock_in"]
    # The parsed file is cached under $XDG_CACHE_HOME, never in the user's home.
    assert list((tmp_path / "xdg-cache" / "jobspool").iterdir()) != []

    with spool.config.open("a") as f:
        f.write("  returns_out: {}\n")
    assert interface_names(spool.run("interfaces")) == [
        "orders_in",
        "orders_out",
        "stock_in",
        "returns_out",
    ]

    # An edit that keeps the file's size is seen too.
    spool.config.write_text(spool.config.read_text().replace("returns_out", "refunds_out"))
    assert interface_names(spool.run("interfaces")) == [
        "orders_in",
        "orders_out",
        "stock_in",
        "refunds_out",
    ]


def test_a_cached_configuration_is_checked_again(spool):
    assert_ok(spool.run("interfaces"))
    # The configuration file is unchanged, but the schema it names is gone.
    (spool.dir / "schemas" / "order.xsd").unlink()
    line = assert_fails(spool.run("interfaces"), 78)
    assert "interfaces.orders_in.schema" in line
    assert "existing schema file" in line


def test_the_cache_is_never_needed(spool, tmp_path):
    # A cache directory that cannot be created is no reason to fail.
    (tmp_path / "not-a-dir").write_text("")
    env = {"XDG_CACHE_HOME": str(tmp_path / "not-a-dir")}
    assert interface_names(spool.run("interfaces", env=env)) == [
        "orders_in",
        "orders_out",
        "stock_in",
    ]
