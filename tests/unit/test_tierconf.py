"""``python -m modelfs.tierconf``: the settings it takes, the ones it refuses (one line on
stderr, exit 2) and what it renders from them."""

from __future__ import annotations

import pytest

from modelfs.tierconf.__main__ import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "", (argv, code, out[:200])
    assert err.startswith("modelfs.tierconf: ") and err.count("\n") == 1, (argv, err)
    return err


def test_origin_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """--origin (required for s3://) is passed once, not again among the other settings."""
    code, out, err = run(
        capsys, "nginx", "--source", "s3://my-bucket", "--origin", "https://s3.us-east-1.amazonaws.com"
    )
    assert code == 0, err
    assert "server s3.us-east-1.amazonaws.com:443;" in out and "location ~ ^(/my\\-bucket/)" in out
    assert 'js_var $tier_auth "aws-sigv4";' in out
    code, out, err = run(
        capsys, "kubernetes", "--source", "https://models.example.com/llama/", "--origin", "https://10.0.0.5:8443"
    )
    assert code == 0, err
    assert "server 10.0.0.5:8443;" in out and "proxy_set_header Host 10.0.0.5:8443;" in out


@pytest.mark.parametrize(
    "argv",
    [
        ("nginx", "--source", "https://[::1/x/"),
        ("nginx", "--source", "https://host:99999/x/"),
        ("nginx", "--source", "https://host:port/x/"),
        ("nginx", "--source", "gs://b", "--origin", "https://[::1"),
        ("nginx", "--source", "gs://b", "--origin", "https://host:70000"),
        ("nginx", "--source", "gs://b", "--origin", "https://user:pw@host"),
        ("nginx", "--source", "s3://b"),
    ],
)
def test_a_malformed_url_is_one_line(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    refused(capsys, *argv)


@pytest.mark.parametrize(
    ("source", "uri_re", "raw_re"),
    [
        ("https://h/my%20models/m.bin", r"/my\x20models/", r"/my\x2520models/"),
        ("https://h/my models/", r"/my\x20models/", r"/my\x2520models/"),  # encoded as the nodes send it
        ("https://h/a%2Fb//c/", r"/a/b/c/", r"/a\x252Fb//c/"),  # nginx decodes %2F and merges slashes
        ("https://h/m%C3%BC(1)$/", r"/m\xc3\xbc\x281\x29\x24/", r"/m\x25C3\x25BC\x281\x29\x24/"),
        ("gs://my-bucket.x", r"/download/storage/v1/b/my\-bucket\.x/o/|", None),
    ],
)
def test_location_matches_the_decoded_path(source: str, uri_re: str, raw_re: str | None) -> None:
    """``location`` matches nginx's ``$uri`` (decoded, slashes merged); the raw-path check
    ``$request_uri`` (what the origin gets) the path as the nodes send it."""
    from modelfs.tierconf import render_nginx, settings_for_source

    conf = render_nginx(settings_for_source(source))
    assert conf.count(f"location ~ ^({uri_re}") == 2, conf
    if raw_re is not None:
        assert f'if ($request_uri !~ "^({raw_re})")' in conf


@pytest.mark.parametrize(
    "source", ["https://h/a/../b/", "https://h/a/%2e%2E/b/x", "https://h/./b/", "https://h/a%0Ab/"]
)
def test_a_directory_the_tier_would_refuse_is_refused_here(capsys: pytest.CaptureFixture[str], source: str) -> None:
    refused(capsys, "nginx", "--source", source)


def test_the_cache_cap_fits_its_volume(capsys: pytest.CaptureFixture[str]) -> None:
    """A --max-size above the volume (--storage) fills the disk (ENOSPC) and benches the
    replica: refused; at most 90% of it, and following it when not given."""
    import yaml

    from modelfs.tierconf import TierSettings, max_size_for, render_kubernetes, settings_for_source

    err = refused(capsys, "kubernetes", "--storage", "1Gi", "--max-size", "100g")
    assert "at most 90% of it, 921m" in err
    refused(capsys, "kubernetes", "--storage", "100Gi", "--max-size", "91g")
    code, out, err = run(capsys, "kubernetes", "--storage", "100Gi", "--max-size", "90g")
    assert code == 0, err
    for storage, max_size in (("1Gi", "921m"), ("50Gi", "45g"), ("120Gi", "100g"), ("2Ti", "100g")):
        code, out, err = run(capsys, "kubernetes", "--storage", storage)
        assert code == 0, err
        assert f" max_size={max_size}\n" in out and max_size_for(storage) == max_size
        statefulset = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "StatefulSet"][0]
        assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == storage
    # The defaults keep the rule.
    assert max_size_for("120Gi") == TierSettings.max_size
    render_kubernetes(settings_for_source("gs://b"))
    for storage in ("1e9", "12 Gi", "-1Gi", "1Mi", "120Gi\nx"):
        refused(capsys, "kubernetes", "--storage", storage)


@pytest.mark.parametrize(
    "argv",
    [
        ("--user", "root;daemon_off"),
        ("--user", "root group"),
        ("--token-file", 'a"b'),
        ("--token-file", "/run/t/token;"),
        ("--max-size", "1g;}"),
        ("--max-size", "0"),
        ("--max-size", "1t"),
        ("--min-free", "1g;}"),
        ("--min-free", "0"),
        ("--cache-dir", "/x;y"),
        ("--cache-dir", "relative"),
        ("--cache-dir", "/x y"),
        ("--cache-dir", "/x\ny"),
        ("--run-dir", "/run/x}"),
        ("--js-dir", "/etc/'x"),
        ("--ca-file", "/etc/x#y"),
        ("--js-module", "/usr/lib/x\\;"),
        ("--error-log", "/var/log/e.log warn"),
        ("--error-log", "syslog:server=x"),
        ("--access-log", "/var/log/$host.log"),
        ("--access-log", "stdout"),
        ("--listen", "8080;"),
        ("--listen", "1.2.3.4:80 default_server"),
        ("--listen", "70000"),
        ("--listen", "[::1:8080"),
        ("--listen", "[nothost]:8080"),
        ("--listen", "a;b:8080"),
        ("--origin-side", "10.0.0.1:8081"),  # it adds the tier's credentials: loopback only
        ("--origin-side", "8081"),
        ("--origin-side", "127.0.0.1:8081;"),
        ("--origin-name", "a;b"),
        ("--slice", "8m;"),
        ("--workers", "0"),
        ("--auth", "basic"),
        ("--region", "us east"),
        ("--replicas", "-3"),
        ("--replicas", "0"),
        ("--replicas", "x"),
        ("--origin", "https://a;b"),
        ("--origin", "https://h:0"),
    ],
)
def test_a_setting_that_would_break_the_config_is_refused(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, str]
) -> None:
    """Settings are pasted into nginx.conf, the unit and the manifests as they are: one that
    would end a directive or add one is refused, one line on stderr, exit 2, whatever is rendered."""
    for what in ("nginx", "systemd", "kubernetes"):
        if argv[0] == "--replicas" and what != "kubernetes":
            continue
        refused(capsys, what, "--run-dir", "/run/modelfs-tier", *argv)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (("--listen", "[::1]:8080"), "listen [::1]:8080 reuseport;"),
        (("--listen", "tier.internal:8080"), "listen tier.internal:8080 reuseport;"),
        (("--listen", "10.1.2.3:9000"), "listen 10.1.2.3:9000 reuseport;"),
        (("--origin-side", "[::1]:8081"), "listen [::1]:8081;"),
        (("--token-file", ""), 'js_var $tier_token_file "";'),
        (("--access-log", "off"), "access_log off modelfs_tier;"),
        (("--error-log", "/var/log/nginx/tier-error.log"), "error_log /var/log/nginx/tier-error.log warn;"),
        (("--max-size", "512000m"), "max_size=512000m"),
        (("--min-free", "2g"), " min_free=2g "),
        (("--slice", "256m"), " min_free=512m "),  # "auto": room for the fill stage's slices
        (("--slice", "1m"), " min_free=32m "),
        (("--user", "nginx"), "user nginx;"),
        (("--cache-dir", "/tmp/pytest-of-x/test_a[b]0/cache"), "proxy_cache_path /tmp/pytest-of-x/test_a[b]0/cache "),
    ],
)
def test_settings_that_are_fine(capsys: pytest.CaptureFixture[str], argv: tuple[str, str], line: str) -> None:
    code, out, err = run(capsys, "nginx", *argv)
    assert code == 0 and line in out, err
