"""The HTTP backend's redirect rules (modelfs/backends/redirects.py), without a network."""

from __future__ import annotations

import httpx
import pytest

from modelfs.backends.redirects import RedirectPolicy, Verdict, is_internal_address
from modelfs.errors import BackendError

ADDRESSES = {
    "cdn.example": ["93.184.216.34"],
    "meta.example": ["169.254.169.254"],
    "sneaky.example": ["93.184.216.35", "127.0.0.1"],
    "models.example": ["93.184.216.36"],
}


async def _resolve(host: str) -> list[str]:
    return ADDRESSES.get(host, [])


def _policy(source: str, *, cross_origin: bool = True) -> RedirectPolicy:
    return RedirectPolicy(source, cross_origin=cross_origin, resolve=_resolve)


async def _check(policy: RedirectPolicy, current: str, target: str) -> bool:
    return (await policy.verdict(httpx.URL(current), httpx.URL(target), "m.bin")).same_origin


async def test_same_origin_keeps_headers_other_origin_drops_them() -> None:
    policy = _policy("https://models.example/dir/")
    assert await _check(policy, "https://models.example/dir/m.bin", "https://models.example/blobs/1") is True
    assert await _check(policy, "https://models.example:443/dir/m.bin", "https://models.example/x") is True
    assert await _check(policy, "https://models.example/dir/m.bin", "https://cdn.example/signed?sig=s") is False
    assert await _check(policy, "https://models.example/dir/m.bin", "https://models.example:8443/x") is False


async def test_other_origin_needs_the_option() -> None:
    policy = _policy("https://models.example/dir/", cross_origin=False)
    with pytest.raises(BackendError, match="another origin") as info:
        await _check(policy, "https://models.example/dir/m.bin", "https://cdn.example/signed?sig=SECRET")
    assert "SECRET" not in str(info.value)  # a presigned target's query is never shown


@pytest.mark.parametrize(
    "target",
    [
        "https://169.254.169.254/computeMetadata/v1/",
        "https://[fe80::1]/x",
        "https://127.0.0.1:8080/admin",
        "https://localhost/x",
        "https://[::ffff:127.0.0.1]/x",
        "https://0.0.0.0/x",
        "https://meta.example/x",  # a name that resolves to the metadata server
        "https://sneaky.example/x",  # one of its addresses is loopback
        "https://metadata.google.internal/x",
    ],
)
async def test_internal_targets_are_refused_from_a_public_source(target: str) -> None:
    with pytest.raises(BackendError, match="internal address"):
        await _check(_policy("https://models.example/dir/"), "https://models.example/dir/m.bin", target)


async def test_a_loopback_source_may_redirect_to_loopback() -> None:
    policy = _policy("http://127.0.0.1:8080/models/")
    assert await _check(policy, "http://127.0.0.1:8080/models/m.bin", "http://127.0.0.1:9000/blob") is False


@pytest.mark.parametrize("target", ["http://models.example/x", "http://cdn.example/x", "ftp://cdn.example/x"])
async def test_never_down_to_plain_http_or_another_scheme(target: str) -> None:
    with pytest.raises(BackendError):
        await _check(_policy("https://models.example/dir/"), "https://models.example/dir/m.bin", target)


def test_internal_addresses() -> None:
    assert is_internal_address("169.254.169.254") and is_internal_address("fd00:ec2::254")
    assert is_internal_address("::1") and not is_internal_address("10.0.0.1")
    assert not is_internal_address("models.example")


async def test_the_verdict_names_the_addresses_that_were_checked() -> None:
    """The data GETs connect to these (http_media.py): a second resolution that answers
    differently (DNS rebinding) is never asked."""
    policy = _policy("https://models.example/dir/")
    here, cdn = httpx.URL("https://models.example/dir/m.bin"), httpx.URL("https://cdn.example/signed")
    assert await policy.verdict(here, httpx.URL("https://models.example/b/1"), "m") == Verdict(True, None)
    assert await policy.verdict(here, cdn, "m") == Verdict(False, ("93.184.216.34",))
    assert await policy.verdict(here, httpx.URL("https://93.184.216.40/x"), "m") == Verdict(False, ("93.184.216.40",))
    assert await policy.verdict(here, httpx.URL("https://nowhere.example/x"), "m") == Verdict(False, ())
    ADDRESSES["cdn.example"] = ["127.0.0.1"]  # the name rebinds to loopback: the next check refuses it
    try:
        with pytest.raises(BackendError, match="internal address"):
            await policy.verdict(here, cdn, "m")
    finally:
        ADDRESSES["cdn.example"] = ["93.184.216.34"]
    # From an internal source nothing is checked, so nothing is pinned.
    assert await _policy("http://127.0.0.1:8080/").verdict(
        httpx.URL("http://127.0.0.1:8080/m"), httpx.URL("http://cdn.example/x"), "m"
    ) == Verdict(False, None)
