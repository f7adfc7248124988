"""`marpipe serve`: a TorchServe in the foreground with the safe configuration (`server.start`), the gRPC front on the
public gRPC port (`grpc_front`), until Ctrl-C or SIGTERM, both of which stop the front, TorchServe, its JVM and its
workers before marpipe exits.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from pipeline.torchserve.fit import config_size
from pipeline.torchserve.limits import DEFAULT_MAX_RESPONSE_SIZE
from pipeline.torchserve.server import Server, grpc_host, start, stop, wait_ready


def _max_message(server: Server) -> int:
    """The largest gRPC message the front passes: TorchServe's own request and response limits, from its config."""
    config = server.workdir / "config.properties"
    sizes = (config_size(config, key, DEFAULT_MAX_RESPONSE_SIZE) for key in ("max_request_size", "max_response_size"))
    return max(DEFAULT_MAX_RESPONSE_SIZE, *sizes)


def serve_forever(args: Any) -> int:
    """`marpipe serve`: TorchServe in the foreground with the safe configuration until Ctrl-C or SIGTERM,
    both of which stop TorchServe, its JVM and its workers before marpipe exits."""
    started: list[Any] = []  # the Server, then the gRPC front
    caught: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        caught.append(signum)
        if started:  # before the server exists, the signal is acted on as soon as it does
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        started.append(
            start(
                args.store,
                host=args.host,
                port=args.port,
                auth=not args.no_auth,
                model_api=args.enable_model_api,
                workdir=args.workdir,
                vmargs=args.vmargs,
            )
        )
        server = started[0]
        if caught:
            raise KeyboardInterrupt
        print(f"TorchServe starting: inference {server.url('inference', '/')}, management {server.url('management', '/')}", file=sys.stderr)
        at = grpc_host(server.host)
        at = f"[{at}]" if ":" in at else at
        from pipeline.torchserve.grpc_front import start_front  # grpcio: only `serve` needs it

        front, port = start_front(server.host, f"{at}:{server.ports['grpc_inference']}", _max_message(server))
        started.append(front)
        public = f"[{server.host}]" if ":" in server.host else server.host
        print(
            f"gRPC: inference {public}:{port} (inference.GRPCInferenceService: ModelInfer and the v2 health and metadata calls; "
            f"TorchServe's Predictions and StreamPredictions); TorchServe's own gRPC on loopback only: inference "
            f"{at}:{server.ports['grpc_inference']}, management {at}:{server.ports['grpc_management']}",
            file=sys.stderr,
        )
        print(f"config, logs and temp files in {server.workdir}", file=sys.stderr)
        status = wait_ready(server, 600)
        for name, s in sorted(status.items()):
            print(f"  {name:<28} {s}", file=sys.stderr)
        if not status:
            print(
                f"no models yet: deploy them with marpipe deploy ARCHIVE --management {server.url('management', '')} "
                f"--inference {server.url('inference', '')} --model-store {args.store}",
                file=sys.stderr,
            )
        if server.auth:
            print(
                f"token authorization is on: keys in {server.workdir / 'key_file.json'}; send 'Authorization: Bearer <inference key>'",
                file=sys.stderr,
            )
        if server.proc.poll() is None:
            print("serving; Ctrl-C stops (so does SIGTERM)", file=sys.stderr)
            server.proc.wait()
        return 0 if server.proc.returncode in (0, None) else 6
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in previous:  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        if started:
            name = signal.Signals(caught[0]).name if caught else None
            print(f"stopping TorchServe{f' ({name})' if name else ''}", file=sys.stderr)
            if len(started) > 1:
                started[1].stop(grace=1).wait(5)
            stop(started[0])
        for sig, handler in previous.items():
            signal.signal(sig, handler)
