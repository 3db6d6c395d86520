"""The Prometheus textfile, checked by Prometheus's own ``promtool``; the shipped alert rules.

The daemon runs for real with ``daemon.metrics`` set; ``promtool check metrics``
(Debian's prometheus package, installed by ``.ci/run``) must accept every file
it writes with no warning at all, from the first one, written before any job,
to the last, written by its clean stop. ``promtool check rules`` and ``promtool
test rules`` check ``etc/jobspool-alerts.rules.yml``: that it loads, and that
its alerts fire on the series the daemon writes.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import yaml

from tests.kit import FAST, Site

RULES = Path(__file__).resolve().parents[1] / "etc" / "jobspool-alerts.rules.yml"


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args],
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_metrics(path: Path) -> str:
    """``promtool check metrics < path`` passes with nothing to say; return the text."""
    text = path.read_text()
    result = promtool("check", "metrics", stdin=text.encode())
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), text
    return text


def samples(text: str) -> dict[str, float]:
    """Each sample line as ``name{labels}`` -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def families(text: str) -> dict[str, str]:
    """Each family's TYPE, and a check that HELP came with it."""
    helped = set(re.findall(r"^# HELP (\S+) ", text, re.MULTILINE))
    typed = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert helped == set(typed), (helped ^ set(typed), text)
    return typed


def configure(site: Site, metrics: Path) -> None:
    handler = site.script("handler", 'case "$1" in *bad*) exit 3;; esac')
    data = {
        "spool": "spool",
        "interfaces": {
            "orders_in": {"schema": "schemas/order.xsd", "command": [handler]},
            "orders_out": {"schema": "schemas/order.xsd"},
        },
        "schedules": {
            "nightly-export": {"every": "0:00:01", "command": ["/bin/false"]},
            "purge": {"at": "2099-01-01 00:00", "template": "purge", "with": {"older_than": "30d"}},
        },
        "daemon": {**FAST, "metrics": str(metrics), "metrics_interval": "0.3s"},
    }
    site.config.write_text(yaml.safe_dump(data, sort_keys=False))
    site.init()


def test_every_file_the_daemon_writes_passes_promtool(site: Site) -> None:
    metrics = site.dir / "jobspool.prom"
    configure(site, metrics)
    before = time.time()
    daemon = site.start()

    # The first file, before any job: every series there, at 0.
    first = samples(check_metrics(site.wait_for(lambda: metrics.exists() and metrics, "metrics")))
    for iface in ("orders_in", "orders_out"):
        for counter in ("processed", "failed", "retried", "rejected"):
            assert first[f'jobspool_jobs_{counter}_total{{interface="{iface}"}}'] == 0
        assert first[f'jobspool_handler_duration_seconds_count{{interface="{iface}"}}'] == 0
        assert first[f'jobspool_incoming_files{{interface="{iface}"}}'] == 0
        assert first[f'jobspool_joberrors_jobs{{interface="{iface}"}}'] == 0
    for outcome in ("ok", "failed", "skipped"):
        assert first[f'jobspool_schedule_runs_total{{schedule="purge",outcome="{outcome}"}}'] == 0
        assert first[f'jobspool_schedule_last_outcome{{schedule="purge",outcome="{outcome}"}}'] == 0
    assert first['jobspool_schedule_last_success_time_seconds{schedule="purge"}'] == 0
    assert first["jobspool_up"] == 1
    assert before - 1 <= first["jobspool_daemon_start_time_seconds"] <= time.time()

    site.drop("orders_in", "good.xml")
    site.drop("orders_in", "bad.xml")
    site.drop("orders_in", "broken.xml", b"<order>")
    for name, place in (("good.xml", "bak/orders_in"), ("bad.xml", "joberrors")):
        site.wait_in(name, place)
    site.wait_in("broken.xml", "joberrors")

    def settled() -> bool:
        now = samples(metrics.read_text())
        return (
            now['jobspool_jobs_processed_total{interface="orders_in"}'] == 1
            and now['jobspool_joberrors_jobs{interface="orders_in"}'] == 2
            and now['jobspool_schedule_last_outcome{schedule="nightly-export",outcome="failed"}']
            == 1
        )

    site.wait_for(settled, "the jobs and a failed scheduled run in the metrics")
    text = check_metrics(metrics)
    now = samples(text)
    assert now['jobspool_jobs_failed_total{interface="orders_in"}'] == 1
    assert now['jobspool_jobs_rejected_total{interface="orders_in"}'] == 1
    assert now['jobspool_handler_duration_seconds_count{interface="orders_in"}'] == 2
    assert now['jobspool_handler_duration_seconds_bucket{interface="orders_in",le="+Inf"}'] == 2
    assert now['jobspool_schedule_runs_total{schedule="nightly-export",outcome="failed"}'] >= 1
    assert now['jobspool_schedule_last_duration_seconds{schedule="nightly-export"}'] >= 0
    assert now['jobspool_schedule_last_run_time_seconds{schedule="nightly-export"}'] >= before - 1
    assert families(text)["jobspool_handler_duration_seconds"] == "histogram"
    assert families(text)["jobspool_jobs_failed_total"] == "counter"
    assert time.time() - now["jobspool_metrics_write_time_seconds"] < 10

    assert daemon.stop() == 0
    last = samples(check_metrics(metrics))
    assert last["jobspool_up"] == 0  # stopped, which the rules tell from a stale file
    assert not [n for n in os.listdir(site.dir) if n.startswith(".jobspool.prom")]


def test_a_restart_remembers_the_last_successful_scheduled_run(site: Site) -> None:
    metrics = site.dir / "jobspool.prom"
    configure(site, metrics)
    assert site.ok("schedule", "run", "purge").strip() != ""  # recorded, outside the daemon
    daemon = site.start()
    text = site.wait_for(lambda: metrics.exists() and check_metrics(metrics), "metrics")
    now = samples(text)
    assert now['jobspool_schedule_last_outcome{schedule="purge",outcome="ok"}'] == 1
    assert now['jobspool_schedule_last_success_time_seconds{schedule="purge"}'] > 0
    # Seeded from history, not counted as a run of this daemon's.
    assert now['jobspool_schedule_runs_total{schedule="purge",outcome="ok"}'] == 0
    daemon.stop()


def test_the_alert_rules_load() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_the_alert_rules_fire_on_what_the_daemon_writes(tmp_path: Path) -> None:
    """``promtool test rules``: a failure, a stale file, a stopped daemon, a stuck queue."""
    i = 'instance="host:9100"'
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # One failure at minute 3; the series was there at 0 before it.
                    {"series": f'jobspool_jobs_failed_total{{{i},interface="orders_in"}}',
                     "values": "0 0 0 1 1 1 1 1"},
                    # Written at 0, 60, ..., 240 s; then the daemon is killed.
                    {"series": f"jobspool_metrics_write_time_seconds{{{i}}}",
                     "values": "0+60x4 240x20"},
                    {"series": f"jobspool_up{{{i}}}", "values": "1x25"},
                    {"series": f'jobspool_queue_oldest_seconds{{{i},interface="orders_in"}}',
                     "values": "0+3600x25"},
                    {"series": f'jobspool_interface_paused{{{i},interface="orders_in"}}',
                     "values": "0x25"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "JobspoolJobsFailed", "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": "JobspoolJobsFailed",
                        "exp_alerts": [{
                            "exp_labels": {"severity": "warning", "instance": "host:9100",
                                           "interface": "orders_in"},
                            "exp_annotations": {
                                "summary": "jobs of orders_in failed on host:9100",
                                "description": '1 job(s) of orders_in failed in the last 15 '
                                'minutes; they are in joberrors with their logs ("jobspool '
                                'log JOB", then "jobspool retry JOB").',
                            },
                        }],
                    },
                    {"eval_time": "8m", "alertname": "JobspoolMetricsStale", "exp_alerts": []},
                    {
                        "eval_time": "12m",
                        "alertname": "JobspoolMetricsStale",
                        "exp_alerts": [{
                            "exp_labels": {"severity": "critical", "instance": "host:9100"},
                            "exp_annotations": {
                                "summary": "jobspool metrics on host:9100 are stale",
                                "description": "The metrics file was last written 8m 0s ago: "
                                'the daemon was killed or hangs ("jobspool daemon-status" says '
                                "which).",
                            },
                        }],
                    },
                    {"eval_time": "12m", "alertname": "JobspoolDaemonStopped", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "JobspoolQueueStuck",
                        "exp_alerts": [{
                            "exp_labels": {"severity": "warning", "instance": "host:9100",
                                           "interface": "orders_in"},
                            "exp_annotations": {
                                "summary": "the queue of orders_in does not move",
                                "description": "The oldest job queued on orders_in waits for "
                                '15h 0m 0s; "jobspool interfaces" says why.',
                            },
                        }],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": [{"series": f"jobspool_up{{{i}}}", "values": "1 1 0x10"}],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "JobspoolDaemonStopped", "exp_alerts": []},
                    {
                        "eval_time": "8m",
                        "alertname": "JobspoolDaemonStopped",
                        "exp_alerts": [{
                            "exp_labels": {"severity": "critical", "instance": "host:9100"},
                            "exp_annotations": {
                                "summary": "jobspool daemon on host:9100 is stopped",
                                "description": "The daemon stopped cleanly and has not started "
                                "again: dropped files wait in incoming/ and nothing is "
                                'processed. "systemctl status jobspool".',
                            },
                        }],
                    },
                ],
            },
        ],
    }  # fmt: skip
    unit = tmp_path / "jobspool-alerts.test.yml"
    unit.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
