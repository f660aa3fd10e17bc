"""``python -m modelfs.tierconf {nginx,js,systemd,kubernetes} --source gs://BUCKET [options]``: print a
cache tier's configuration (see :mod:`modelfs.tierconf` and docs/operations.md)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import NoReturn

from modelfs.errors import ConfigError
from modelfs.logs import escape
from modelfs.tierconf import (
    TierSettings,
    max_size_for,
    render_kubernetes,
    render_nginx,
    render_systemd,
    settings_for_source,
    tier_js,
)

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad option is one line on stderr, exit 2, like a bad setting."""
        raise ConfigError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m modelfs.tierconf", description=__doc__)
    parser.add_argument("what", choices=["nginx", "js", "systemd", "kubernetes"])
    parser.add_argument("--source", default="gs://my-bucket", help="the bucket (or https directory) the tier serves")
    parser.add_argument("--origin", help="the store's endpoint (default: GCS; required for s3://)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--storage",
        default="120Gi",
        help="Kubernetes: each replica's cache volume; --max-size is at most 90%% of it"
        " and, when not given, follows it (at most 100g)",
    )
    # Every setting but origin (--origin above) and allow (from --source) is an option.
    options = [f for f in dataclasses.fields(TierSettings) if f.name not in ("origin", "allow")]
    for field in options:
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, help=f"default: {field.default}")
    try:
        args = parser.parse_args(argv)
        overrides = {f.name: getattr(args, f.name) for f in options if getattr(args, f.name) is not None}
        if args.what == "kubernetes" and args.max_size is None:
            overrides["max_size"] = max_size_for(args.storage)
        settings = settings_for_source(args.source, origin=args.origin, **overrides)
        if args.what == "nginx":
            sys.stdout.write(render_nginx(settings))
        elif args.what == "js":
            sys.stdout.write(tier_js())
        elif args.what == "systemd":
            sys.stdout.write(render_systemd(settings))
        else:
            sys.stdout.write(render_kubernetes(settings, replicas=args.replicas, storage=args.storage))
    except ConfigError as exc:
        print(f"modelfs.tierconf: {escape(str(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
