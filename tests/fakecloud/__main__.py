"""Run the fake cloud standalone until Ctrl-C.

python -m tests.fakecloud --port 8774 --boot-time 30 --quota 400 --clouds-yaml ./clouds.yaml
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .server import FakeCloud


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakecloud",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--boot-time", type=float, default=0.0, help="seconds in BUILD")
    parser.add_argument("--delete-time", type=float, default=0.0, help="seconds in DELETED")
    parser.add_argument("--volume-time", type=float, default=0.0, help="seconds in creating")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--quota", type=int, default=10, help="max instances (-1 unlimited)")
    parser.add_argument("--cores", type=int, default=-1, help="max cores (-1 unlimited)")
    parser.add_argument("--ram", type=int, default=-1, help="max RAM MiB (-1 unlimited)")
    parser.add_argument("--network-name", default="private")
    parser.add_argument(
        "--ide",
        choices=("none", "stub", "jupyterlab"),
        default="none",
        help="what answers on an ACTIVE server's (loopback) fixed IP",
    )
    parser.add_argument("--ide-port", type=int, default=8888)
    parser.add_argument("--clouds-yaml", help="write a clouds.yaml here")
    parser.add_argument("--cloud-name", default="fake")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    cloud = FakeCloud(
        args.host,
        args.port,
        quiet=not args.verbose,
        boot_time=args.boot_time,
        delete_time=args.delete_time,
        volume_time=args.volume_time,
        latency=args.latency,
        max_instances=args.quota,
        max_cores=args.cores,
        max_ram=args.ram,
        network_name=args.network_name,
        ide=args.ide,
        ide_port=args.ide_port,
    )
    cloud.start()
    print(f"fakecloud listening on {cloud.url} (auth_url {cloud.auth_url})", flush=True)
    if args.clouds_yaml:
        path = cloud.clouds_yaml(args.clouds_yaml, args.cloud_name)
        print(
            f"wrote {path}: clouds {args.cloud_name!r} and {args.cloud_name + '-appcred'!r}",
            flush=True,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cloud.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
